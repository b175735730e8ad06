"""This rank as a phase sees it: the model, its process groups and the phase-1 attention kernel. The modes'
phase 1 and the decode loops get this narrow object, not the engine that drives them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..model.llama import StarLlama
from ..ops.attention import AttnFn
from ..parallel.groups import ParallelGroups


@dataclass(frozen=True)
class Host:
    model: StarLlama
    groups: ParallelGroups
    attn: AttnFn

    def run_without_tokens(self, step) -> None:
        """Drive ``step`` through every layer with zero local tokens, for hosts that only relay."""
        g, m = self.groups, self.model
        tp = g.tp.size()
        empty = lambda h: torch.empty(1, h // tp, 0, m.arch.head_dim, dtype=m.dtype, device=g.device)  # noqa: E731
        for layer in range(m.arch.num_layers):
            step(layer, empty(m.arch.num_heads), empty(m.arch.num_kv_heads), empty(m.arch.num_kv_heads), 1.0)
