"""What core attention does in each kind of forward pass (an :class:`~star_mcore.model.AttentionStep`).

Phase 1 encodes the context into the hosts' KV sequences; phase 2 runs each request's query pass, then the
decode steps of the whole running batch.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..ops.attention import AttnFn, attend, attend_prefix_causal
from ..ops.layout import Span
from ..ops.merge import merge_partials
from ..ops.paged_attention import PagedKernel, PagedLayout
from ..parallel.anchor import AnchorBroadcast
from ..parallel.context_parallel import gather_merge, ring_attention
from ..parallel.neighbour import NeighbourKV
from .kv_cache import KVPool, KVSequence

Tensor = torch.Tensor


class EncodeSegment:
    """Phase 1 of one segment on one host, no communication: causal attention over the segment, then
    cache its KV except the first ``n_drop`` tokens (a star block's anchor)."""

    def __init__(self, fn: AttnFn, cache: KVSequence, n_drop: int = 0) -> None:
        self.fn, self.cache, self.n_drop = fn, cache, n_drop

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, _ = attend(self.fn, q, k, v, causal=True, scale=scale)
        self.cache.append(layer, k[:, :, self.n_drop:], v[:, :, self.n_drop:])
        return out


class SharedAnchor:
    """The anchor's per-layer K, V on one host during phase 1: published in pieces by the hosts that encode it
    (block 0's, and with a long anchor the next blocks'), received once per layer by the others, reused for every
    later block of the host, dropped after phase 1. ``index``: this host's piece among the pieces, if it has one
    (the pieces before it are what its own anchor blocks see)."""

    def __init__(self, num_layers: int, exchange: Optional[AnchorBroadcast], index: int = 0) -> None:
        self.exchange, self.index = exchange, index
        self.kv: List[Optional[Tuple[Tensor, Tensor]]] = [None] * num_layers

    def publish(self, layer: int, k: Tensor, v: Tensor) -> None:
        """This host's piece: k, v [b, hk, n, d] of its tokens inside the anchor (on one host: all of it)."""
        if self.exchange is None:
            self.kv[layer] = (k, v)
        else:
            self.exchange.post(layer, (k, v))

    def before(self, layer: int) -> Optional[Tuple[Tensor, Tensor]]:
        """The pieces of the hosts before this one, joined (None where there are none)."""
        if self.exchange is None or self.index == 0:
            return None
        return _joined(self.exchange.get(layer, self.index))

    def get(self, layer: int) -> Tuple[Tensor, Tensor]:
        if self.kv[layer] is None:
            self.kv[layer] = _joined(self.exchange.get(layer))
        return self.kv[layer]

    def finish(self) -> None:
        if self.exchange is not None:
            self.exchange.finish()


def _joined(pieces: List[Tuple[Tensor, Tensor]]) -> Tuple[Tensor, Tensor]:
    if len(pieces) == 1:
        return pieces[0]
    return torch.cat([k for k, _ in pieces], 2), torch.cat([v for _, v in pieces], 2)


class EncodeAnchorBlocks:
    """Shared anchor: this host's blocks that start inside the anchor (block 0, and with a long anchor the next
    ones), in one forward and exactly: they attend to the anchor pieces of the hosts before this one without a
    mask and to themselves causally; their first ``n_piece`` tokens' K, V are published as this host's piece of
    the anchor. All their KV is cached."""

    def __init__(self, fn: AttnFn, cache: KVSequence, anchor: SharedAnchor, n_piece: int) -> None:
        self.fn, self.cache, self.anchor, self.n_piece = fn, cache, anchor, n_piece

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        self.anchor.publish(layer, k[:, :, : self.n_piece], v[:, :, : self.n_piece])
        before = self.anchor.before(layer)
        if before is None:
            out, _ = attend(self.fn, q, k, v, causal=True, scale=scale)
        else:
            out, _ = attend_prefix_causal(self.fn, q, *before, k, v, scale=scale)
        self.cache.append(layer, k, v)
        return out


class EncodeWithAnchor:
    """A block past the anchor in shared-anchor mode: the segment (``n_drop`` re-encoded landmark tokens, then the
    block) attends to the anchor's K, V without a mask and to itself causally (two kernel calls merged by LSE);
    only the block's own KV is cached."""

    def __init__(self, fn: AttnFn, cache: KVSequence, anchor: SharedAnchor, n_drop: int = 0) -> None:
        self.fn, self.cache, self.anchor, self.n_drop = fn, cache, anchor, n_drop

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        ak, av = self.anchor.get(layer)
        out, _ = attend_prefix_causal(self.fn, q, ak, av, k, v, scale=scale)
        self.cache.append(layer, k[:, :, self.n_drop:], v[:, :, self.n_drop:])
        return out


class EncodeWithPrevious:
    """``anchor+previous``: one forward of all of this host's ``blocks`` (contiguous, in order). Block k >= 1
    attends to the anchor's first ``n_anchor`` K, V and to the previous block's phase-1 K, V past the anchor,
    without a mask, and to itself causally; block 0 publishes the anchor. The previous block of the host's first
    block is the neighbour host's last (``prev``), received through ``exchange`` while this host attends to the
    rest. Every token's KV is cached."""

    def __init__(self, fn: AttnFn, cache: KVSequence, blocks: Sequence[Span], anchor: Optional[SharedAnchor],
                 n_anchor: int, prev: Optional[Span], exchange: Optional[NeighbourKV]) -> None:
        self.fn, self.cache, self.blocks, self.anchor, self.n_anchor = fn, cache, blocks, anchor, n_anchor
        self.prev, self.exchange = prev, exchange

    def _past_anchor(self, prev: Span) -> int:
        """Tokens at the front of block ``prev`` that the anchor already holds."""
        return max(0, self.n_anchor - prev.start)

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        base = self.blocks[0].start
        at = lambda t, s: t[:, :, s.start - base:s.end - base]  # noqa: E731 - this forward's rows of block s
        if self.exchange is not None:
            last = self.blocks[-1]
            self.exchange.post(at(k, last), at(v, last))
        if self.anchor is not None and base == 0:
            self.anchor.publish(layer, k[:, :, : self.n_anchor], v[:, :, : self.n_anchor])
        ak = av = k[:, :, :0]
        if self.anchor is not None and any(b.start for b in self.blocks):
            ak, av = self.anchor.get(layer)
        outs = []
        for j, blk in enumerate(self.blocks):
            qj, kj, vj = at(q, blk), at(k, blk), at(v, blk)
            if blk.start == 0:
                outs.append(attend(self.fn, qj, kj, vj, causal=True, scale=scale))
                continue
            pk, pv = ak, av
            if j > 0:
                prev, skip = self.blocks[j - 1], self._past_anchor(self.blocks[j - 1])
                pk, pv = torch.cat([ak, at(k, prev)[:, :, skip:]], 2), torch.cat([av, at(v, prev)[:, :, skip:]], 2)
            outs.append(attend_prefix_causal(self.fn, qj, pk, pv, kj, vj, scale=scale))
        if self.prev is not None:  # the first block's previous block, from the neighbour host
            o, lse = outs[0]
            rk, rv = self.exchange.received()
            skip = self._past_anchor(self.prev)
            o2, lse2 = attend(self.fn, at(q, self.blocks[0]), rk[:, :, skip:], rv[:, :, skip:], causal=False,
                              scale=scale)
            outs[0] = merge_partials(torch.stack([o, o2]), torch.stack([lse, lse2]))
        if self.exchange is not None:
            self.exchange.finish()
        self.cache.append(layer, k, v)
        return torch.cat([o for o, _ in outs], dim=2)


class EncodeRing:
    """Phase 1 of ring mode: exact causal attention with KV passed around the CP group."""

    def __init__(self, fn: AttnFn, cache: KVSequence, group: dist.ProcessGroup,
                 chunks: Sequence[Tuple[Span, Span]]) -> None:
        self.fn, self.cache, self.group, self.chunks = fn, cache, group, chunks

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out = ring_attention(self.fn, q, k, v, group=self.group, chunks=self.chunks, scale=scale)
        self.cache.append(layer, k, v)
        return out


def _query_partial(fn: AttnFn, q: Tensor, k: Tensor, v: Tensor, context: KVSequence, own: Optional[KVSequence],
                   layer: int, scale: float) -> Tuple[Tensor, Tensor]:
    """One request's local partial in phase 2: its context share (no mask: every context token precedes the
    query) and, on the query host, its own earlier tokens (no mask) and the new ones (causal), whose K, V are
    then appended. q [1, hq, s, d], k, v [1, hk, s, d] -> out [1, hq, s, d], lse [1, hq, s]."""
    ck, cv = context.get(layer, like=k)
    if own is None:
        return attend(fn, q, ck, cv, causal=False, scale=scale)
    ok, ov = own.get(layer, like=k)
    parts = [attend(fn, q, ck, cv, causal=False, scale=scale), attend(fn, q, ok, ov, causal=False, scale=scale),
             attend(fn, q, k, v, causal=True, scale=scale)]
    own.append(layer, k, v)
    return merge_partials(torch.stack([o for o, _ in parts]), torch.stack([lse for _, lse in parts]))


class QueryStep:
    """Phase 2's query pass for one request, the same for star, ring and none.

    The query is replicated on every host. Each host attends to its share of the context; the query host also
    attends to the query itself causally and appends its KV to the request's own sequence. The partials meet in
    one all-gather of packed (out, lse) and an exact LSE merge.
    """

    def __init__(self, fn: AttnFn, context: KVSequence, own: Optional[KVSequence], group: dist.ProcessGroup) -> None:
        self.fn, self.context, self.own, self.group = fn, context, own, group

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, lse = _query_partial(self.fn, q, k, v, self.context, self.own, layer, scale)
        out, _ = gather_merge(out, lse, self.group)
        return out


class EagerBatchStep:
    """A decode step of the running batch, one token per request, with dynamic shapes: each request's partial
    through the phase-1 kernel on its own KV (as :class:`QueryStep`), then ONE all-gather for the whole batch.
    The reference the paged step is tested against. ``seqs``: per token, (context, own or None)."""

    def __init__(self, fn: AttnFn, seqs: Sequence[Tuple[KVSequence, Optional[KVSequence]]],
                 group: dist.ProcessGroup) -> None:
        self.fn, self.seqs, self.group = fn, seqs, group

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        parts = [_query_partial(self.fn, q[:, :, i:i + 1], k[:, :, i:i + 1], v[:, :, i:i + 1], ctx, own, layer, scale)
                 for i, (ctx, own) in enumerate(self.seqs)]
        out, _ = gather_merge(torch.cat([o for o, _ in parts], dim=2), torch.cat([lse for _, lse in parts], dim=2),
                              self.group)
        return out


class PagedBatchStep:
    """A decode step of the running batch with static shapes, for graph capture: one token per slot; the query
    host writes each slot's K, V at ``write_at`` (pool positions, device [S]; idle slots write to the scratch
    page), then every host runs the paged kernel over ``layout`` (its groups: the contexts of the batch, read
    once each, and on the query host every slot's own tokens) and the partials meet in one all-gather."""

    def __init__(self, kernel: PagedKernel, pool: KVPool, layout: PagedLayout, write_at: Optional[Tensor],
                 group: dist.ProcessGroup) -> None:
        self.kernel, self.pool, self.layout, self.write_at, self.group = kernel, pool, layout, write_at, group

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        _, hq, s, d = q.shape
        kp, vp = self.pool.k[layer], self.pool.v[layer]
        hk = kp.shape[0]
        if self.write_at is not None:
            kp.view(hk, -1, d).index_copy_(1, self.write_at, k[0])
            vp.view(hk, -1, d).index_copy_(1, self.write_at, v[0])
        qs = q[0].permute(1, 0, 2).reshape(s, hk, hq // hk, d)  # [S, hk, g, d]
        out, lse = self.kernel(qs, kp, vp, self.layout, scale)
        out = out.reshape(s, hq, d).permute(1, 0, 2)[None]  # [1, hq, S, d]
        lse = lse.reshape(s, hq).permute(1, 0)[None]
        out, _ = gather_merge(out, lse, self.group)
        return out.to(q.dtype)
