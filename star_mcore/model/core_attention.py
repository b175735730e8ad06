"""This project's core attention for Megatron-core's SelfAttention, plugged in through the layer spec.

mcore's SelfAttention does the QKV projection, then calls ``core_attention(q, k, v, ...)`` with q [sq, b, hq, d]
and k, v [sq, b, hk, d] of the tokens of this forward pass (this TP rank's heads). RoPE is applied here, with the
angles the model computed once for the forward pass (:attr:`AttentionRuntime.rope`). What attention means for
those tokens (phase-1 star block, ring, phase-2 query over a sharded KV cache, ...) is decided by the inference
engine, which attaches the step for its forward passes (``with model.attending(step)``).
"""

from __future__ import annotations

from typing import Optional, Protocol, Tuple

import torch

from ..mcore_compat import MegatronModule
from ..ops.rope import apply_rope

Tensor = torch.Tensor


class AttentionStep(Protocol):
    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        """layer: 0-based; q [b, hq, s, d], k, v [b, hk, s, d] -> out [b, hq, s, d]."""


class AttentionRuntime:
    """Shared by every layer's core attention of one model: the step of the current forward pass, and per layer
    and row the float32 sum of its attention output, kept on the device (no sync per layer): NaN/Inf anywhere
    makes the sum non-finite, and an attention output (a weighted mean of values) cannot overflow it. A row is
    one request of the forward: the whole forward for phase 1 and the query pass, one token per slot in a
    batched decode step, so a NaN in one request's step fails that request alone. A reduction and an add per
    layer: the guard costs a decode step two small kernels a layer."""

    def __init__(self, num_layers: int) -> None:
        self.step: Optional[AttentionStep] = None
        self.rope: Optional[Tuple[Tensor, Tensor]] = None  # cos, sin [s, d/2] of the current forward's positions
        self.num_layers = num_layers
        self.sums: Optional[Tensor] = None  # [num_layers, rows]

    def reset_guard(self, device: torch.device, rows: int = 1) -> None:
        if self.sums is None or self.sums.device != device or self.sums.shape[1] != rows:
            self.sums = torch.zeros(self.num_layers, rows, dtype=torch.float32, device=device)
        else:
            self.sums.zero_()  # once per decode step: no new allocation

    def record(self, layer: int, out: Tensor) -> None:
        """out [b, h, s, d]: one row (its sum), or s rows (one per token) when the guard has s rows."""
        if self.sums is not None:
            if self.sums.shape[1] == 1:
                self.sums[layer] += torch.sum(out, dtype=torch.float32)  # accumulates over a phase's forwards
            else:
                self.sums[layer] += torch.sum(out, dim=(0, 1, 3), dtype=torch.float32)

    def first_nonfinite_layer(self) -> Tensor:
        """[rows] int64: per row the first layer whose output was not finite, or num_layers if none (no sync)."""
        idx = torch.arange(self.num_layers, device=self.sums.device)[:, None]
        return torch.where(torch.isfinite(self.sums), self.num_layers, idx).amin(dim=0)


class StarCoreAttention(MegatronModule):
    """Core attention: RoPE on q and k, then q, k, v to the runtime's current step."""

    def __init__(self, config, layer_number: int, attn_mask_type=None, attention_type: str = "self",
                 cp_comm_type: Optional[str] = None, softmax_scale: Optional[float] = None,
                 pg_collection=None, *, runtime: AttentionRuntime) -> None:
        super().__init__(config=config)
        self.layer_index = layer_number - 1  # mcore numbers layers from 1
        self.runtime = runtime
        self.softmax_scale = softmax_scale if softmax_scale is not None else config.kv_channels ** -0.5

    def forward(self, query: Tensor, key: Tensor, value: Tensor, attention_mask=None, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None) -> Tensor:
        if self.runtime.step is None:
            raise RuntimeError("no attention step is set: run the model through star_mcore.inference")
        sq, b = query.shape[:2]
        cos, sin = self.runtime.rope
        query, key = apply_rope(query, cos, sin), apply_rope(key, cos, sin)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        out = self.runtime.step(self.layer_index, q, k, v, self.softmax_scale)
        self.runtime.record(self.layer_index, out)
        return out.permute(2, 0, 1, 3).reshape(sq, b, -1)
