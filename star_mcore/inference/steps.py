"""What core attention does in each kind of forward pass (an :class:`~star_mcore.model.AttentionStep`).

Phase 1 encodes the context into the hosts' KV caches; phase 2 runs the query and the generated tokens.
"""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..ops.attention import AttnFn, attend, attend_prefix_causal
from ..ops.decode_attention import DecodeKernel
from ..ops.layout import Span
from ..parallel.anchor import AnchorBroadcast
from ..parallel.context_parallel import gather_merge, ring_attention
from .kv_cache import KVCache

Tensor = torch.Tensor


class EncodeSegment:
    """Phase 1 of one segment on one host, no communication: causal attention over the segment, then
    cache its KV except the first ``n_drop`` tokens (a star block's anchor)."""

    def __init__(self, fn: AttnFn, cache: KVCache, n_drop: int = 0) -> None:
        self.fn, self.cache, self.n_drop = fn, cache, n_drop

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out, _ = attend(self.fn, q, k, v, causal=True, scale=scale)
        self.cache.append(layer, k[:, :, self.n_drop:], v[:, :, self.n_drop:])
        return out


class SharedAnchor:
    """The anchor's per-layer K, V on one host during phase 1: published by the host that encodes block 0,
    received once per layer by the others, reused for every later block of the host, dropped after phase 1."""

    def __init__(self, num_layers: int, exchange: Optional[AnchorBroadcast]) -> None:
        self.exchange = exchange
        self.kv: List[Optional[Tuple[Tensor, Tensor]]] = [None] * num_layers

    def publish(self, layer: int, k: Tensor, v: Tensor) -> None:
        self.kv[layer] = (k.contiguous(), v.contiguous())
        if self.exchange is not None:
            self.exchange.send(*self.kv[layer])

    def get(self, layer: int) -> Tuple[Tensor, Tensor]:
        if self.kv[layer] is None:
            self.kv[layer] = self.exchange.recv(layer)
        return self.kv[layer]

    def finish(self) -> None:
        if self.exchange is not None:
            self.exchange.finish()


class EncodeFirstBlock:
    """Block 0 in shared-anchor mode: causal attention, all its KV cached, its first ``n_anchor`` tokens'
    K, V published as the anchor."""

    def __init__(self, fn: AttnFn, cache: KVCache, anchor: SharedAnchor, n_anchor: int) -> None:
        self.fn, self.cache, self.anchor, self.n_anchor = fn, cache, anchor, n_anchor

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        self.anchor.publish(layer, k[:, :, : self.n_anchor], v[:, :, : self.n_anchor])
        out, _ = attend(self.fn, q, k, v, causal=True, scale=scale)
        self.cache.append(layer, k, v)
        return out


class EncodeWithAnchor:
    """Block k >= 1 in shared-anchor mode: the block attends to the anchor's K, V without a mask and to
    itself causally (two kernel calls merged by LSE); only the block's own KV is cached."""

    def __init__(self, fn: AttnFn, cache: KVCache, anchor: SharedAnchor) -> None:
        self.fn, self.cache, self.anchor = fn, cache, anchor

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        ak, av = self.anchor.get(layer)
        out, _ = attend_prefix_causal(self.fn, q, ak, av, k, v, scale=scale)
        self.cache.append(layer, k, v)
        return out


class EncodeRing:
    """Phase 1 of ring mode: exact causal attention with KV passed around the CP group."""

    def __init__(self, fn: AttnFn, cache: KVCache, group: dist.ProcessGroup,
                 chunks: Sequence[Tuple[Span, Span]]) -> None:
        self.fn, self.cache, self.group, self.chunks = fn, cache, group, chunks

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        out = ring_attention(self.fn, q, k, v, group=self.group, chunks=self.chunks, scale=scale)
        self.cache.append(layer, k, v)
        return out


class QueryStep:
    """Phase 2 (the query, then each generated token), the same for star and ring.

    The new tokens are replicated on every host. Each host attends to its whole local KV (no mask: every
    context token precedes the query); the query host also attends to the new tokens causally and appends
    their KV. The partials meet in one all-gather of packed (out, lse) and an exact LSE merge.
    """

    def __init__(self, fn: AttnFn, cache: KVCache, group: dist.ProcessGroup, is_query_host: bool) -> None:
        self.fn, self.cache, self.group, self.is_query_host = fn, cache, group, is_query_host

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        ck, cv = self.cache.get(layer, like=k)
        if self.is_query_host:
            out, lse = attend_prefix_causal(self.fn, q, ck, cv, k, v, scale=scale)
            self.cache.append(layer, k, v)
        else:
            out, lse = attend(self.fn, q, ck, cv, causal=False, scale=scale)
        out, _ = gather_merge(out, lse, self.group)
        return out


class StaticQueryStep:
    """Phase 2's decode step with static shapes, for graph capture: one new token, the KV buffers at their
    final size, lengths on the device. The query host writes the token's K, V at ``write_at`` and attends to
    ``attend_len`` = write_at + 1 keys; the other hosts attend to their whole share. One all-gather of the
    packed partials and the exact merge, as in :class:`QueryStep`.
    """

    def __init__(self, kernel: DecodeKernel, cache: KVCache, group: dist.ProcessGroup, attend_len: Tensor,
                 write_at: Optional[Tensor]) -> None:
        self.kernel, self.cache, self.group = kernel, cache, group
        self.attend_len, self.write_at = attend_len, write_at

    def __call__(self, layer: int, q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
        kb, vb = self.cache.buffers(layer, like=k)
        if self.write_at is not None:
            kb.index_copy_(2, self.write_at, k)
            vb.index_copy_(2, self.write_at, v)
        out, lse = self.kernel(q, kb, vb, self.attend_len, scale)
        out, _ = gather_merge(out, lse, self.group)
        return out.to(q.dtype)
