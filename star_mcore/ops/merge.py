"""Exact merge of attention partials computed over disjoint key sets.

If partial i attended to key set K_i and returned (o_i, l_i), the attention over the union of the K_i is
    lse = log sum_i exp(l_i),   out = sum_i exp(l_i - lse) * o_i.
"""

from __future__ import annotations

from typing import Tuple

import torch

from .triton_support import triton_available

Tensor = torch.Tensor


def merge_partials(outs: Tensor, lses: Tensor) -> Tuple[Tensor, Tensor]:
    """outs [n, ..., d], lses [n, ...] (float32) -> out [..., d] (outs' dtype), lse [...] (float32).

    Stable for any magnitudes; a partial with lse = -inf (no visible keys) has weight 0, and if every
    partial is empty the result is out 0, lse -inf. On CUDA with Triton it is one fused launch (phase 2 runs
    it in every layer of every decode step); elsewhere the same formula in torch ops.
    """
    if outs.is_cuda and outs.stride(-1) == 1 and triton_available():
        from .triton_kernels import merge_rows

        n, d = outs.shape[0], outs.shape[-1]
        out, lse = merge_rows(outs.reshape(n, -1, d), lses.reshape(n, -1))
        return out.reshape(outs.shape[1:]).to(outs.dtype), lse.reshape(lses.shape[1:])
    lses = lses.float()
    m = lses.max(dim=0).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # all -inf: keep exp() finite
    w = torch.exp(lses - m)  # [n, ...]
    total = w.sum(dim=0)
    out = (w[..., None] * outs.float()).sum(dim=0) / total.clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    lse = m + torch.log(total)
    return out.to(outs.dtype), lse
