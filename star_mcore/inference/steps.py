"""What core attention does in each kind of forward pass (an :class:`~star_mcore.model.AttentionStep`).

Phase 1 encodes the context into the hosts' KV caches; phase 2 runs the query and the generated tokens.
"""

from __future__ import annotations

from typing import Sequence, Tuple

import torch
import torch.distributed as dist

from ..ops.attention import AttnFn, attend, attend_prefix_causal
from ..ops.layout import Span
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


class EncodeRing:
    """Phase 1 of ring mode: exact causal attention with KV passed around the CP group."""

    def __init__(self, fn: AttnFn, cache: KVCache, group: dist.ProcessGroup, chunks: Sequence[Tuple[Span, Span]]) -> None:
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
