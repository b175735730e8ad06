"""Few-query attention over a fixed-size KV buffer whose valid length is a device tensor: phase 2's decode
kernel. Static shapes and no host reads, so a decode step built on it can be captured in a CUDA graph.

    out, lse = kernel(q, k, v, kv_len, scale)
    q       [b, hq, sq, d]        the new tokens' queries (sq small: one per decode step)
    k, v    [b, hk, cap, d]       the KV buffer at its final size; keys at index >= kv_len are ignored
    kv_len  [b] integer tensor    on q's device
    out     [b, hq, sq, d] float32, lse [b, hq, sq] float32 (natural log; -inf and out 0 where kv_len is 0)

Every query row sees every valid key (no mask): in phase 2 the context precedes the query, and a decode
step's own token is written into the buffer before the call.
"""

from __future__ import annotations

import math
from typing import Callable, Optional, Tuple

import torch

from .triton_support import triton_available

Tensor = torch.Tensor
DecodeKernel = Callable[[Tensor, Tensor, Tensor, Tensor, float], Tuple[Tensor, Tensor]]


def _fold(q: Tensor, hk: int) -> Tensor:
    """[b, hq, sq, d] -> [b, hk, (hq // hk) * sq, d]: the query heads of a KV group share its reads."""
    b, hq, sq, d = q.shape
    return q.reshape(b, hk, (hq // hk) * sq, d)


def _unfold(out: Tensor, lse: Tensor, q: Tensor) -> Tuple[Tensor, Tensor]:
    b, hq, sq, d = q.shape
    return out.reshape(b, hq, sq, d), lse.reshape(b, hq, sq)


def masked_decode_attention(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor, scale: float) -> Tuple[Tensor, Tensor]:
    """Reference kernel: float32 softmax over the whole buffer with the tail masked. Any device; reads the whole
    buffer, so it is the CPU path and the fallback, not a fast GPU kernel."""
    hk, cap = k.shape[1], k.shape[2]
    qf = _fold(q, hk).float()
    scores = torch.matmul(qf, k.float().transpose(-1, -2)) * scale  # [b, hk, rows, cap]
    visible = torch.arange(cap, device=q.device)[None, :] < kv_len.reshape(-1, 1)  # [b, cap]
    scores = scores.masked_fill(~visible[:, None, None, :], -math.inf)
    m = scores.amax(dim=-1, keepdim=True) if cap else scores.new_full(scores.shape[:-1] + (1,), -math.inf)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    p = torch.exp(scores - m)
    total = p.sum(dim=-1)
    # the tail is unwritten memory (NaN possible, and 0 * NaN = NaN): zero it rather than trust p = 0
    vf = torch.where(visible[:, None, :, None], v.float(), 0.0)
    out = torch.matmul(p, vf) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    lse = m[..., 0] + torch.log(total)
    return _unfold(out, lse, q)


def split_kv_decode_attention(q: Tensor, k: Tensor, v: Tensor, kv_len: Tensor,
                              scale: float) -> Tuple[Tensor, Tensor]:
    """Triton split-KV kernel: the buffer is cut into splits, one program per (KV head, split) reads its keys
    once for all the group's query rows and skips splits past ``kv_len``; a second launch merges the splits."""
    from . import triton_kernels as tk

    hk = k.shape[1]
    qf = _fold(q, hk).contiguous()
    sms = torch.cuda.get_device_properties(q.device).multi_processor_count if q.is_cuda else 4
    splits = tk.num_splits(k.shape[2], q.shape[0] * hk, sms)
    parts, lses = tk.split_kv_attention(qf, k, v, kv_len, scale, splits)
    out, lse = tk.merge_rows(parts.reshape(splits, -1, q.shape[-1]), lses.reshape(splits, -1))
    return _unfold(out, lse, q)


def resolve_decode_kernel(device: torch.device, name: Optional[str] = None) -> DecodeKernel:
    """``split_kv`` (Triton) on CUDA where Triton imports, else ``masked``; a name forces one."""
    if name is None:
        name = "split_kv" if device.type == "cuda" and triton_available() else "masked"
    if name == "masked":
        return masked_decode_attention
    if name == "split_kv":
        if not triton_available():
            raise ValueError("the split_kv decode kernel needs Triton")
        return split_kv_decode_attention
    raise ValueError(f"unknown decode kernel {name!r} (split_kv, masked)")
