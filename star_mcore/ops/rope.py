"""Rotary position embeddings from a Llama config.json: plain, large theta, and ``rope_type: llama3``.

The rotation is applied by this project's core attention, not by Megatron-core (the model's decoder gets no
``rotary_pos_emb``): the cosines and sines are computed once per forward pass (:func:`rope_cos_sin`) and every
layer rotates q and k with them in one kernel each (:func:`apply_rope`; rotate-half convention, as HF Llama).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional, Tuple

import torch

from .triton_support import triton_available

Tensor = torch.Tensor


def inv_frequencies(head_dim: int, theta: float, rope_scaling: Optional[Mapping[str, Any]] = None) -> Tensor:
    """[head_dim // 2] float32 inverse frequencies."""
    inv = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
    rope_type = (rope_scaling or {}).get("rope_type", (rope_scaling or {}).get("type", "default"))
    if rope_type in (None, "default"):
        return inv
    if rope_type == "llama3":
        return _llama3_scale(inv, rope_scaling)
    raise ValueError(f"unsupported rope_scaling type {rope_type!r} (supported: default, llama3)")


def _llama3_scale(inv: Tensor, cfg: Mapping[str, Any]) -> Tensor:
    """Llama 3.1: keep high frequencies, divide low ones by ``factor``, blend smoothly in between."""
    factor = float(cfg["factor"])
    low_ff = float(cfg.get("low_freq_factor", 1.0))
    high_ff = float(cfg.get("high_freq_factor", 4.0))
    old_ctx = float(cfg["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low_ff, old_ctx / high_ff
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
    smooth = (old_ctx / wavelen - low_ff) / (high_ff - low_ff)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, blended, scaled)


def rope_cos_sin(position_ids: Tensor, inv_freq: Tensor) -> Tuple[Tensor, Tensor]:
    """position_ids [s] (int) -> cos, sin [s, head_dim // 2] float32, on inv_freq's device."""
    ang = position_ids.to(device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cos(ang), torch.sin(ang)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [s, b, h, d] (any strides, last dim contiguous) rotated by the angles of its s positions: the first
    half of d becomes x1 cos - x2 sin, the second x2 cos + x1 sin. Returns a new contiguous tensor in x's dtype.

    On CUDA with Triton, one fused launch (float32 inside); elsewhere torch ops in x's dtype, as HF Llama."""
    if x.is_cuda and x.stride(-1) == 1 and triton_available():
        from .triton_kernels import rope_rotate

        return rope_rotate(x, cos, sin)
    half = x.shape[-1] // 2
    c, s_ = cos.to(x.dtype)[:, None, None, :], sin.to(x.dtype)[:, None, None, :]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat([x1 * c - x2 * s_, x2 * c + x1 * s_], dim=-1)
