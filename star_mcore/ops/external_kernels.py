"""Attention kernels of libraries outside torch (FlashAttention 2, 3 and 4, TransformerEngine) behind the
``(out, lse)`` interface of :mod:`.attention`: q [b, hq, sq, d], k/v [b, hk, sk, d] -> out [b, hq, sq, d],
lse [b, hq, sq] float32.

The libraries take [b, s, h, d]: q, k, v go in as transposed views (the last dim stays contiguous, nothing is
copied, except for TransformerEngine) with GQA as is (hq != hk), and out comes back as a view. They need CUDA
and fp16/bf16; ``resolve_backend`` checks that and imports the library, so the functions here check
nothing (the tests run them on CPU against stand-in modules). Each imports its module at call time, a
dictionary look-up once it is loaded: importing star_mcore never imports them.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Optional, Tuple

import torch

Tensor = torch.Tensor

# backend -> the module it calls (and the distribution that provides it)
LIBRARIES = {
    "flash_attn2": ("flash_attn", "flash-attn 2.x"),
    "flash_attn3": ("flash_attn_interface", "FlashAttention-3, flash-attention's hopper/ build"),
    "flash_attn4": ("flash_attn.cute", "flash-attn-4"),
    "te": ("transformer_engine.pytorch.cpp_extensions.fused_attn", "transformer-engine 2.x"),
}


@functools.lru_cache(maxsize=None)
def _accepts(fn, arg: str) -> bool:
    return arg in inspect.signature(fn).parameters


def _bshd(x: Tensor) -> Tensor:
    return x.transpose(1, 2)


def flash_attn2_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                          scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """FlashAttention-2: ``flash_attn_func(..., return_attn_probs=True)`` returns (out, lse [b, h, sq], probs);
    probs is None without dropout. Long KV with few queries is split by the library itself."""
    fa2 = importlib.import_module("flash_attn")
    out, lse, _ = fa2.flash_attn_func(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale, causal=causal,
                                      return_attn_probs=True)
    return out.transpose(1, 2), lse


def flash_attn3_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                          scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """FlashAttention-3 (Hopper). ``flash_attn_func`` returns the LSE when given ``return_attn_probs=True``
    (sources since Aug 2025); before that it took no such flag and returned (out, lse) in some releases and
    out alone in others, so those builds go through ``flash_attn_with_kvcache(return_softmax_lse=True)``,
    which returns (out, lse, ...) in all of them. ``num_splits=0``: the library splits long KV for few
    queries (decode) instead of running one CTA per head."""
    fa3 = importlib.import_module("flash_attn_interface")
    args = (_bshd(q), _bshd(k), _bshd(v))
    if _accepts(fa3.flash_attn_func, "return_attn_probs"):
        out, lse = fa3.flash_attn_func(*args, softmax_scale=scale, causal=causal, num_splits=0,
                                       return_attn_probs=True)
    else:
        out, lse, *_ = fa3.flash_attn_with_kvcache(*args, softmax_scale=scale, causal=causal, num_splits=0,
                                                   return_softmax_lse=True)
    return out.transpose(1, 2), lse


def flash_attn4_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                          scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """FlashAttention-4 (CuTe DSL, Hopper and Blackwell): ``flash_attn_func`` returns (out, lse); lse
    [b, h, sq] is computed only with ``return_lse=True`` when nothing needs a gradient. ``num_splits=0``:
    the library's split-KV heuristic, as for FA3; except on Hopper, whose FA4 kernels have no split-KV (the
    library asserts, seen on H100 with 4.0.0b36)."""
    fa4 = importlib.import_module("flash_attn.cute")
    splits = 1 if q.is_cuda and torch.cuda.get_device_capability(q.device)[0] == 9 else 0
    out, lse = fa4.flash_attn_func(_bshd(q), _bshd(k), _bshd(v), softmax_scale=scale, causal=causal,
                                   num_splits=splits, return_lse=True)
    return out.transpose(1, 2), lse


def te_fused_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
                       scale: Optional[float] = None) -> Tuple[Tensor, Tensor]:
    """TransformerEngine's cuDNN fused attention, through ``fused_attn_fwd`` (``cpp_extensions``: TE's public
    modules return no LSE) with the F16 arbitrary-seqlen backend and the bshd layout. TE reads q, k, v by
    pointer as contiguous tensors, so they are copied to [b, s, h, d]; the batch size comes from cu_seqlens
    (every sequence full). Releases that take ``o_format`` (2.20) write out in that layout, sbhd unless told;
    earlier 2.x releases in q's. The softmax stats (the LSE, [b, h, sq, 1]) are the first aux tensor, produced
    only with ``is_training=True``: no dropout, so the result is the same."""
    te = importlib.import_module("transformer_engine.pytorch.cpp_extensions.fused_attn")
    b, _, sq, _ = q.shape
    sk = k.shape[2]
    cu_q = torch.arange(0, (b + 1) * sq, sq, dtype=torch.int32, device=q.device)
    cu_k = torch.arange(0, (b + 1) * sk, sk, dtype=torch.int32, device=q.device)
    q, k, v = (_bshd(x).contiguous() for x in (q, k, v))
    layout = {"o_format": "bshd"} if _accepts(te.fused_attn_fwd, "o_format") else {}
    out, aux = te.fused_attn_fwd(True, sq, sk, cu_q, cu_k, q, k, v, q.dtype,
                                 te.FusedAttnBackend["F16_arbitrary_seqlen"], attn_scale=scale, dropout=0.0,
                                 qkv_layout="bshd_bshd_bshd", attn_bias_type="no_bias",
                                 attn_mask_type="causal" if causal else "no_mask", **layout)
    return out.transpose(1, 2), aux[0][..., 0]


def require_library(name: str) -> None:
    """Refuse backend ``name`` with one line (ValueError) if its module does not import, or is a version
    without the call its function makes."""
    module, dist = LIBRARIES[name]
    try:
        lib = importlib.import_module(module)
    except ImportError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise ValueError(f"attention backend {name!r} needs the module {module} ({dist}), "
                         f"which does not import here: {reason}") from None
    call = "fused_attn_fwd" if name == "te" else "flash_attn_func"
    if not hasattr(lib, call):  # e.g. flash-attn-4 alone installs a `flash_attn` package without FA2 in it
        raise ValueError(f"attention backend {name!r} needs {module}.{call} ({dist}); the module here has none")
    if name == "flash_attn4" and not _accepts(lib.flash_attn_func, "return_lse"):
        raise ValueError(f"attention backend 'flash_attn4': {module}.flash_attn_func has no return_lse "
                         "(flash-attn-4 betas before Feb 2026); upgrade flash-attn-4")
    if name == "te" and not _accepts(lib.fused_attn_fwd, "fake_dtype"):
        raise ValueError(f"attention backend 'te' needs transformer-engine 2.x ({module}.fused_attn_fwd "
                         "takes no fake_dtype: TE 1.x)")
