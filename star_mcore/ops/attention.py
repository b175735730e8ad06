"""Attention kernels with a flash-attn style functional core: ``out, lse = attend(q, k, v, causal=...)``.

Layout everywhere in this module (torch SDPA's):
    q   [b, hq, sq, d]
    k,v [b, hk, sk, d]      hq % hk == 0 (GQA: each KV head serves hq // hk query heads)
    out [b, hq, sq, d]      in q's dtype
    lse [b, hq, sq]         float32, natural log of sum(exp(scale * q.k)) over the visible keys

``causal=True`` is the square, top-left mask (sq == sk; query i sees keys 0..i). Everything the
engine needs beyond that (a query that sees a prefix fully and itself causally) is composed from two
calls and an LSE merge: see :func:`attend_prefix_causal`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch

from .external_kernels import (LIBRARIES, flash_attn2_attention, flash_attn3_attention, flash_attn4_attention,
                               require_library, te_fused_attention)
from .merge import merge_partials

Tensor = torch.Tensor
AttnFn = Callable[..., Tuple[Tensor, Tensor]]


def _expand_kv(k: Tensor, hq: int) -> Tensor:
    """[b, hk, s, d] -> [b, hq, s, d] by repeating each KV head for its query group."""
    hk = k.shape[1]
    if hk == hq:
        return k
    b, _, s, d = k.shape
    return k[:, :, None].expand(b, hk, hq // hk, s, d).reshape(b, hq, s, d)


def _empty(q: Tensor) -> Tuple[Tensor, Tensor]:
    b, h, s, _ = q.shape
    return torch.zeros_like(q), torch.full((b, h, s), -math.inf, dtype=torch.float32, device=q.device)


def math_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                   scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Reference kernel: explicit softmax in float32. Any device, any dtype."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) * scale
    if causal:
        sq, sk = scores.shape[-2:]
        keep = torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)
    probs = torch.exp(scores - lse[..., None])
    out = torch.matmul(probs, v.float())
    return out.to(q.dtype), lse


def sdpa_flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                         scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """torch's flash kernels (CPU: the tiled flash kernel for CPU; CUDA: FlashAttention-2)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    if q.is_cuda:
        res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
    else:
        res = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)
    return res[0], res[1].float()


def sdpa_efficient_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                             scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """torch's memory-efficient (xformers-derived) CUDA kernel."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
    # The LSE comes back padded along the query axis to the kernel's tile size.
    return res[0], res[1][:, :, : q.shape[2]].float()


def sdpa_cudnn_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                         scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """cuDNN's fused flash attention (the fastest torch op on Hopper)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    k, v = _expand_kv(k, q.shape[1]), _expand_kv(v, q.shape[1])
    res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False, scale=scale)
    lse = res[1]
    if lse.dim() == 4:  # some cuDNN versions return [b, h, sq, 1]
        lse = lse[..., 0]
    return res[0], lse.float()


BACKENDS: Dict[str, AttnFn] = {
    "math": math_attention,
    "sdpa_flash": sdpa_flash_attention,
    "sdpa_efficient": sdpa_efficient_attention,
    "sdpa_cudnn": sdpa_cudnn_attention,
    "flash_attn2": flash_attn2_attention,
    "flash_attn3": flash_attn3_attention,
    "flash_attn4": flash_attn4_attention,
    "te": te_fused_attention,
}
CUDA_ONLY = {"sdpa_efficient", "sdpa_cudnn", *LIBRARIES}
HALF = (torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class AutoCuda:
    """``auto`` on CUDA in half precision: one kernel for long query blocks (phase 1; >= 256 rows once GQA is
    folded), one for few queries (phase 2). Decode needs split-KV (few rows, a long cache) and a kernel
    without per-shape planning: cuDNN builds an execution plan per shape, and a decode step's KV length is
    new at every step."""

    blocks: AttnFn
    decode: AttnFn

    def __call__(self, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                 scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
        fn = self.blocks if q.shape[2] >= 256 else self.decode
        return fn(q, k, v, causal=causal, scale=scale)


# Each list: the first backend whose library imports, on a GPU of one of the listed compute capabilities
# (None: any), is taken. Measured on H100 (docs/performance.md): FA4 runs phase-1 blocks 5-20% faster than
# cuDNN, but has no split-KV on SM90, so it is no decode kernel there; FA3 (FlashAttention's Hopper kernels,
# with split-KV) is preferred by its published figures, not measured here. TransformerEngine (cuDNN's same
# kernels, measured on H200) runs phase-1 blocks 0-7% slower than sdpa_cudnn: not listed.
AUTO_BLOCKS = [("flash_attn4", {(9, 0)}), ("flash_attn3", {(9, 0)}), ("sdpa_cudnn", None)]
AUTO_DECODE = [("flash_attn3", {(9, 0)}), ("sdpa_flash", None)]


def _first_usable(preference, capability) -> AttnFn:
    for name, capabilities in preference:
        if capabilities is not None and capability not in capabilities:
            continue
        if name in LIBRARIES:
            try:
                require_library(name)
            except ValueError:
                continue
        return BACKENDS[name]
    raise AssertionError("the last entry of an auto preference list must be usable everywhere")


def _auto_cuda_half(device: torch.device) -> AutoCuda:
    capability = torch.cuda.get_device_capability(device)
    return AutoCuda(_first_usable(AUTO_BLOCKS, capability), _first_usable(AUTO_DECODE, capability))


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> AttnFn:
    """Pick a kernel by name; ``auto`` takes the fastest one known to work on this device. A backend that
    cannot run here (device, dtype, library not importable) is refused with one line (ValueError)."""
    if name == "auto":
        if device.type == "cuda":
            if dtype in HALF:
                return _auto_cuda_half(device)
            name = "sdpa_efficient"
        else:
            name = "sdpa_flash"
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of auto, {', '.join(BACKENDS)}")
    if name in CUDA_ONLY and device.type != "cuda":
        raise ValueError(f"attention backend {name!r} needs a CUDA device")
    if name in LIBRARIES:
        if dtype not in HALF:
            raise ValueError(f"attention backend {name!r} needs fp16 or bf16 (model.precision), got {dtype}")
        require_library(name)
    return BACKENDS[name]


def attend(fn: AttnFn, q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
           scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """Run ``fn``, with the empty-key case handled (out 0, lse -inf: a neutral partial for the merge).

    Without a mask, GQA is run with the query heads of each KV group folded into the sequence axis
    ([b, hk, g*sq, d]): the KV is never repeated, which matters most in decoding over a long cache.
    """
    b, hq, sq, d = q.shape
    hk = k.shape[1]
    if k.shape[2] == 0 or sq == 0:
        return _empty(q)
    if causal:
        if sq != k.shape[2]:
            raise ValueError(f"causal attention needs sq == sk, got {sq} and {k.shape[2]}")
        return fn(q, k, v, causal=True, scale=scale)
    if hq == hk:
        return fn(q, k, v, causal=False, scale=scale)
    g = hq // hk
    out, lse = fn(q.reshape(b, hk, g * sq, d), k, v, causal=False, scale=scale)
    return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq)


def attend_prefix_causal(fn: AttnFn, q: Tensor, k_prefix: Tensor, v_prefix: Tensor, k_self: Tensor,
                         v_self: Tensor, *, scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """q sees every prefix key and its own keys causally (a bottom-right causal mask over
    ``[prefix; self]``), as two kernel calls merged by LSE.

    q [b, hq, s, d]; k_prefix, v_prefix [b, hk, p, d]; k_self, v_self [b, hk, s, d].
    """
    o1, l1 = attend(fn, q, k_prefix, v_prefix, causal=False, scale=scale)
    o2, l2 = attend(fn, q, k_self, v_self, causal=True, scale=scale)
    return merge_partials(torch.stack([o1, o2]), torch.stack([l1, l2]))


def accumulate_ring_step(fn: AttnFn, acc: list, q_parts: Sequence[Tensor], q_ids: Sequence[int],
                         k_parts: Sequence[Tensor], v_parts: Sequence[Tensor], k_ids: Sequence[int],
                         scale: Optional[float] = None) -> None:
    """One step of causal ring attention: every local query chunk against the key chunks in hand.

    Chunks carry their global order (``q_ids``/``k_ids``): a key chunk after the query chunk is invisible,
    the same chunk is causal, an earlier one fully visible. ``acc[i]`` holds query chunk i's running
    (out, lse), or None before its first partial; updated in place by an exact LSE merge.
    """
    for i, qid in enumerate(q_ids):
        for j, kid in enumerate(k_ids):
            if kid > qid:
                continue
            o, l = attend(fn, q_parts[i], k_parts[j], v_parts[j], causal=(kid == qid), scale=scale)
            acc[i] = (o, l) if acc[i] is None else merge_partials(
                torch.stack([acc[i][0], o]), torch.stack([acc[i][1], l]))
