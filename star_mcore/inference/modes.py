"""The context-parallel modes, one object each, built once from the config (:func:`context_parallel_mode`):
what phase 1 does on a host, how much of the context each host keeps, and the phase-1 footprint the memory
planner counts. Phase 2 is the same for every mode (the engine's)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch

from ..config import InferenceConfig
from ..ops.layout import Span, landmark_spans, ring_chunks, star_block_tokens, star_layout
from ..parallel.anchor import AnchorBroadcast
from ..parallel.neighbour import NeighbourKV
from .kv_cache import KVSequence
from .steps import (EncodeAnchorBlocks, EncodeRing, EncodeSegment, EncodeWithAnchor, EncodeWithPrevious,
                    SharedAnchor)

if TYPE_CHECKING:
    from .host import Host

Tensor = torch.Tensor


@dataclass(frozen=True)
class Phase1Footprint:
    """What phase 1 holds beside the KV cache on its busiest host, in tokens."""

    forward_tokens: int  # the largest single forward (its activations)
    anchor_kv_tokens: int = 0  # shared anchor: the anchor's K, V of every layer, kept through phase 1
    # one layer's K, V beside the one in use: ring's in flight; anchor+previous's received block and a block's prefix
    layer_kv_tokens: int = 0


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
        return Phase1Footprint(forward_tokens=segment, layer_kv_tokens=2 * segment)

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
    """``star``: blocks spread contiguously over the hosts, each block after the first encoded with the anchor
    (``star_context``: and the previous block, or landmarks of the blocks between); no communication, except
    the anchor's KV per layer in ``shared`` anchor mode and, with ``anchor+previous``, one p2p hop per layer."""

    block_size: int
    anchor_size: int
    anchor_mode: str = "shared"  # shared | recompute
    partition: str = "uniform"  # uniform | balanced
    star_context: str = "anchor"  # anchor | long_anchor | anchor+previous | anchor+landmarks
    landmarks: int = 4
    landmark_size: int = 64
    name = "star"

    def layout(self, context_len: int, cp_size: int):
        return star_layout(context_len, self.block_size, self.anchor_size, self.partition, cp_size)

    def context_shares(self, context_len: int, cp_size: int) -> List[int]:
        return [sum(len(b) for b in host) for host in self.layout(context_len, cp_size)]

    def anchor_tokens(self, layout) -> int:
        """Tokens of the anchor phase 1 needs: no block sees more than the context before its start."""
        return min(self.anchor_size, max((b.start for host in layout for b in host), default=0))

    @staticmethod
    def anchor_pieces(layout, n_anchor: int) -> List[Tuple[int, int]]:
        """(host, tokens) of each host whose blocks start inside the anchor: those blocks are encoded exactly, and
        their tokens inside the anchor are the host's piece of it (block 0's host alone where a <= block 0)."""
        pieces = []
        for h, blocks in enumerate(layout):
            inside = [b for b in blocks if b.start < n_anchor]
            if inside:
                pieces.append((h, min(n_anchor, inside[-1].end) - inside[0].start))
        return pieces

    def landmarks_of(self, block: Span) -> List[Span]:
        """The landmark chunks block ``block`` is encoded with (none but with ``anchor+landmarks``)."""
        if self.star_context != "anchor+landmarks" or block.start == 0:
            return []
        return landmark_spans(block.start, self.anchor_size, self.landmarks, self.landmark_size)

    def footprint(self, context_len: int, cp_size: int) -> Phase1Footprint:
        layout = self.layout(context_len, cp_size)
        blocks = [b for host in layout for b in host]
        if not blocks:
            return Phase1Footprint(forward_tokens=0)
        a = self.anchor_tokens(layout)
        shared = a if self.anchor_mode == "shared" and cp_size > 1 else 0
        if self.star_context == "anchor+previous":  # one forward per host; a block's prefix and the received one
            largest = max(len(b) for b in blocks)
            return Phase1Footprint(forward_tokens=max(sum(len(b) for b in host) for host in layout),
                                   anchor_kv_tokens=shared, layer_kv_tokens=a + 2 * largest)
        if self.anchor_mode == "recompute":
            forward = max(min(a, b.start) + sum(len(s) for s in self.landmarks_of(b)) + len(b) for b in blocks)
            return Phase1Footprint(forward_tokens=forward)
        # shared: a host's blocks inside the anchor in one forward, every later block with its landmarks
        inside = max(sum(len(b) for b in host if b.start < a) for host in layout)
        later = max((sum(len(s) for s in self.landmarks_of(b)) + len(b) for b in blocks if b.start >= a), default=0)
        return Phase1Footprint(forward_tokens=max(inside, later), anchor_kv_tokens=shared)

    def prefill(self, host: "Host", context_ids: Tensor, cache: KVSequence) -> None:
        g, m = host.groups, host.model
        layout = self.layout(len(context_ids), g.cp_size)
        n_anchor = self.anchor_tokens(layout)
        if self.anchor_mode == "recompute":
            for block in layout[g.cp_rank]:
                ids, pos, n_drop = star_block_tokens(context_ids, block, n_anchor, self.landmarks_of(block))
                with m.attending(EncodeSegment(host.attn, cache, n_drop=n_drop)):
                    m.hidden(ids, pos)
            return
        anchor, mine = None, layout[g.cp_rank]
        if n_anchor:
            pieces = self.anchor_pieces(layout, n_anchor)
            exchange = None
            if g.cp_size > 1:
                head_shape = (1, m.arch.num_kv_heads // g.tp.size(), m.arch.head_dim)
                exchange = AnchorBroadcast(g.cp, m.arch.num_layers, pieces, head_shape, m.dtype, g.device)
            anchor = SharedAnchor(m.arch.num_layers, exchange,
                                  next((i for i, (r, _) in enumerate(pieces) if r == g.cp_rank), 0))
            if not mine:
                for layer in range(m.arch.num_layers):  # no blocks here, but every host takes part in the broadcasts
                    anchor.get(layer)
        if self.star_context == "anchor+previous":
            self._prefill_with_previous(host, context_ids, cache, layout, anchor, n_anchor)
        else:
            inside = [b for b in mine if b.start < n_anchor]
            if inside:  # encoded exactly, in one forward; their tokens inside the anchor are this host's piece
                pos = torch.arange(inside[0].start, inside[-1].end)
                with m.attending(EncodeAnchorBlocks(host.attn, cache, anchor,
                                                    min(n_anchor, inside[-1].end) - inside[0].start)):
                    m.hidden(context_ids[pos], pos)
            for block in mine[len(inside):]:
                ids, pos, n_drop = star_block_tokens(context_ids, block, 0, self.landmarks_of(block))
                step = (EncodeWithAnchor(host.attn, cache, anchor, n_drop) if anchor
                        else EncodeSegment(host.attn, cache, n_drop=n_drop))
                with m.attending(step):
                    m.hidden(ids, pos)
        if anchor is not None:
            anchor.finish()

    def _prefill_with_previous(self, host: "Host", context_ids: Tensor, cache: KVSequence, layout,
                               anchor: Optional[SharedAnchor], n_anchor: int) -> None:
        """``anchor+previous``: this host's blocks in one forward; the neighbours' last blocks by p2p."""
        g, m = host.groups, host.model
        r, blocks = g.cp_rank, layout[g.cp_rank]
        if not blocks:
            return
        prev = layout[r - 1][-1] if r > 0 else None
        send = r + 1 < g.cp_size and bool(layout[r + 1])
        exchange = None
        if send or prev is not None:
            shape = None if prev is None else (2, 1, m.arch.num_kv_heads // g.tp.size(), len(prev), m.arch.head_dim)
            exchange = NeighbourKV(g.cp, send, shape, m.dtype, g.device)
        pos = torch.arange(blocks[0].start, blocks[-1].end)
        with m.attending(EncodeWithPrevious(host.attn, cache, blocks, anchor, n_anchor, prev, exchange)):
            m.hidden(context_ids[pos], pos)


def context_parallel_mode(inference: InferenceConfig) -> ContextParallelMode:
    """The mode object of ``inference.context_parallel_mode`` (validated by the config schema)."""
    name = inference.context_parallel_mode
    if name == "star":
        return StarAttention(inference.block_size, inference.anchor_size, inference.anchor_mode, inference.partition,
                             inference.star_context, inference.landmarks, inference.landmark_size)
    if name == "ring":
        return RingAttention()
    if name == "none":
        return GlobalAttention()
    raise ValueError(f"unknown context_parallel_mode {name!r}")
