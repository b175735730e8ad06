"""The context-parallel modes, one object each, built once from the config (:func:`context_parallel_mode`):
what phase 1 does on a host, how much of the context each host keeps, and the phase-1 footprint the memory
planner counts. Phase 2 is the same for every mode (the engine's)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, List

import torch

from ..config import InferenceConfig
from ..ops.layout import ring_chunks, star_block_tokens, star_layout
from ..parallel.anchor import AnchorBroadcast
from .kv_cache import KVSequence
from .steps import EncodeFirstBlock, EncodeRing, EncodeSegment, EncodeWithAnchor, SharedAnchor

if TYPE_CHECKING:
    from .host import Host

Tensor = torch.Tensor


@dataclass(frozen=True)
class Phase1Footprint:
    """What phase 1 holds beside the KV cache on its busiest host, in tokens."""

    forward_tokens: int  # the largest single forward (its activations)
    anchor_kv_tokens: int = 0  # shared anchor: the anchor's K, V of every layer, kept through phase 1
    ring_kv_tokens: int = 0  # ring: one layer's K, V in flight beside the one in use


class ContextParallelMode(ABC):
    name: str

    def check(self, cp_size: int) -> None:
        """Refuse (ValueError) a CP group this mode cannot run on."""

    @abstractmethod
    def context_shares(self, context_len: int, cp_size: int) -> List[int]:
        """Context tokens each host keeps in its KV cache."""

    @abstractmethod
    def footprint(self, context_len: int, cp_size: int) -> Phase1Footprint:
        ...

    @abstractmethod
    def prefill(self, host: "Host", context_ids: Tensor, cache: KVSequence) -> None:
        """Phase 1: this host's share of ``context_ids`` [L] into ``cache``."""


class GlobalAttention(ContextParallelMode):
    """``none``: the whole context on one host, plain causal attention."""

    name = "none"

    def check(self, cp_size: int) -> None:
        if cp_size != 1:
            raise ValueError("context_parallel_mode=none needs context_parallel_size=1")

    def context_shares(self, context_len: int, cp_size: int) -> List[int]:
        return [context_len]

    def footprint(self, context_len: int, cp_size: int) -> Phase1Footprint:
        return Phase1Footprint(forward_tokens=context_len)

    def prefill(self, host: "Host", context_ids: Tensor, cache: KVSequence) -> None:
        with host.model.attending(EncodeSegment(host.attn, cache)):
            host.model.hidden(context_ids, torch.arange(len(context_ids)))


class RingAttention(ContextParallelMode):
    """``ring``: exact causal attention, KV passed around the CP group, load-balanced chunks."""

    name = "ring"

    def context_shares(self, context_len: int, cp_size: int) -> List[int]:
        return [len(a) + len(b) for a, b in ring_chunks(context_len, cp_size)]

    def footprint(self, context_len: int, cp_size: int) -> Phase1Footprint:
        segment = max(self.context_shares(context_len, cp_size))
        return Phase1Footprint(forward_tokens=segment, ring_kv_tokens=2 * segment)

    def prefill(self, host: "Host", context_ids: Tensor, cache: KVSequence) -> None:
        g, m = host.groups, host.model
        chunks = ring_chunks(len(context_ids), g.cp_size)
        a, b = chunks[g.cp_rank]
        pos = torch.cat([torch.arange(a.start, a.end), torch.arange(b.start, b.end)])
        with m.attending(EncodeRing(host.attn, cache, g.cp, chunks)) as step:
            if len(pos):
                m.hidden(context_ids[pos], pos)
            else:  # a context shorter than the CP group: this host still relays KV
                host.run_without_tokens(step)


@dataclass(frozen=True)
class StarAttention(ContextParallelMode):
    """``star``: blocks spread contiguously over the hosts, each block after the first encoded with the anchor;
    no communication, except the anchor's KV per layer in ``shared`` anchor mode."""

    block_size: int
    anchor_size: int
    anchor_mode: str = "shared"  # shared | recompute
    partition: str = "uniform"  # uniform | balanced
    name = "star"

    def layout(self, context_len: int, cp_size: int):
        return star_layout(context_len, self.block_size, self.anchor_size, self.partition, cp_size)

    def context_shares(self, context_len: int, cp_size: int) -> List[int]:
        return [sum(len(b) for b in host) for host in self.layout(context_len, cp_size)]

    def footprint(self, context_len: int, cp_size: int) -> Phase1Footprint:
        extra = self.anchor_size if self.anchor_mode == "recompute" else 0
        blocks = [b for host in self.layout(context_len, cp_size) for b in host]
        forward = max(len(b) + (extra if b.start else 0) for b in blocks) if blocks else 0
        shared = self.anchor_size if self.anchor_mode == "shared" and cp_size > 1 else 0
        return Phase1Footprint(forward_tokens=forward, anchor_kv_tokens=shared)

    def prefill(self, host: "Host", context_ids: Tensor, cache: KVSequence) -> None:
        g, m = host.groups, host.model
        layout = self.layout(len(context_ids), g.cp_size)
        n_anchor = min(self.anchor_size, len(layout[0][0]))
        needs_anchor = n_anchor > 0 and len(context_ids) > len(layout[0][0])
        if self.anchor_mode == "recompute" or not needs_anchor:
            for block in layout[g.cp_rank]:
                ids, pos, n_drop = star_block_tokens(context_ids, block, n_anchor)
                with m.attending(EncodeSegment(host.attn, cache, n_drop=n_drop)):
                    m.hidden(ids, pos)
            return
        exchange = None
        if g.cp_size > 1:
            shape = (1, m.arch.num_kv_heads // g.tp.size(), n_anchor, m.arch.head_dim)
            exchange = AnchorBroadcast(g.cp, m.arch.num_layers, shape, m.dtype, g.device)
        anchor = SharedAnchor(m.arch.num_layers, exchange)
        if not layout[g.cp_rank] and g.cp_rank != 0:
            for layer in range(m.arch.num_layers):  # no blocks here, but every host takes part in the broadcast
                anchor.get(layer)
        for block in layout[g.cp_rank]:
            pos = torch.arange(block.start, block.end)
            step = (EncodeFirstBlock(host.attn, cache, anchor, n_anchor) if block.start == 0
                    else EncodeWithAnchor(host.attn, cache, anchor))
            with m.attending(step):
                m.hidden(context_ids[pos], pos)
        anchor.finish()


def context_parallel_mode(inference: InferenceConfig) -> ContextParallelMode:
    """The mode object of ``inference.context_parallel_mode`` (validated by the config schema)."""
    name = inference.context_parallel_mode
    if name == "star":
        return StarAttention(inference.block_size, inference.anchor_size, inference.anchor_mode, inference.partition)
    if name == "ring":
        return RingAttention()
    if name == "none":
        return GlobalAttention()
    raise ValueError(f"unknown context_parallel_mode {name!r}")
