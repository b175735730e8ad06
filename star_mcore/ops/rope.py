"""Rotary position embeddings from a Llama config.json: plain, large theta, and ``rope_type: llama3``.

Frequencies are returned in the layout Megatron-core's ``apply_rotary_pos_emb`` takes for bshd tensors
(``[s, 1, 1, head_dim]``, the half-dim angles repeated twice, rotate-half convention, as HF Llama).
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Optional

import torch

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


def rotary_angles(position_ids: Tensor, inv_freq: Tensor) -> Tensor:
    """position_ids [s] (int) -> angles [s, 1, 1, 2 * len(inv_freq)] float32."""
    ang = position_ids.to(device=inv_freq.device, dtype=torch.float32)[:, None] * inv_freq[None, :]
    return torch.cat([ang, ang], dim=-1)[:, None, None, :]
