"""Collectives of the context-parallel group: the phase-2 LSE merge and ring attention's KV rotation."""

from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..ops.attention import AttnFn, accumulate_ring_step
from ..ops.layout import Span, ring_chunk_ids
from ..ops.merge import merge_partials

Tensor = torch.Tensor
# torch >= 2.13 renamed all_gather_into_tensor (the old name warns); older torch only has the old one.
all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def gather_merge(out: Tensor, lse: Tensor, group: dist.ProcessGroup) -> Tuple[Tensor, Tensor]:
    """Exact global attention from every host's partial: ONE all-gather of ``[out | lse]`` packed in
    float32, then the LSE merge (identical on every host, so all hosts continue with the same states).

    out [b, h, s, d], lse [b, h, s] -> same shapes.
    """
    size = group.size()
    if size == 1:
        return out, lse
    packed = torch.cat([out.float(), lse.float()[..., None]], dim=-1).contiguous()
    gathered = packed.new_empty((size * packed.shape[0],) + packed.shape[1:])
    all_gather_single(gathered, packed, group=group)
    gathered = gathered.view((size,) + packed.shape)
    merged, merged_lse = merge_partials(gathered[..., :-1], gathered[..., -1])
    return merged.to(out.dtype), merged_lse


def broadcast_from_last(t: Tensor, group: dist.ProcessGroup) -> Tensor:
    """Broadcast ``t`` from the group's last rank (the query host) to the others, in place."""
    if group.size() > 1:
        dist.broadcast(t, src=dist.get_global_rank(group, group.size() - 1), group=group)
    return t


def ring_attention(fn: AttnFn, q: Tensor, k: Tensor, v: Tensor, *, group: dist.ProcessGroup,
                   chunks: Sequence[Tuple[Span, Span]], scale: Optional[float] = None) -> Tensor:
    """Exact causal attention over a context laid out by :func:`ops.layout.ring_chunks`.

    Host r holds chunks (r, 2P-1-r) concatenated: q [b, hq, n_r, d], k, v [b, hk, n_r, d]. The KV of every
    host travels once around the ring (p2p, the next transfer in flight while this one is used); each
    (query chunk, key chunk) pair is skipped, fully visible, or causal by the chunks' order. Returns out
    [b, hq, n_r, d].
    """
    size, rank = group.size(), group.rank()
    q_split = (len(chunks[rank][0]), len(chunks[rank][1]))
    q_parts = torch.split(q, q_split, dim=2)
    acc: List[Optional[Tuple[Tensor, Tensor]]] = [None, None]
    kv = torch.stack([k, v])
    nxt, prv = dist.get_global_rank(group, (rank + 1) % size), dist.get_global_rank(group, (rank - 1) % size)
    for step in range(size):
        owner = (rank - step) % size
        reqs, incoming = [], None
        if step < size - 1:
            src_owner = (owner - 1) % size
            n_in = len(chunks[src_owner][0]) + len(chunks[src_owner][1])
            incoming = kv.new_empty(kv.shape[:3] + (n_in,) + kv.shape[4:])
            reqs = dist.batch_isend_irecv([dist.P2POp(dist.isend, kv.contiguous(), nxt, group),
                                           dist.P2POp(dist.irecv, incoming, prv, group)])
        sizes = (len(chunks[owner][0]), len(chunks[owner][1]))
        accumulate_ring_step(fn, acc, q_parts, ring_chunk_ids(rank, size), torch.split(kv[0], sizes, dim=2),
                             torch.split(kv[1], sizes, dim=2), ring_chunk_ids(owner, size), scale)
        for r in reqs:
            r.wait()
        if incoming is not None:
            kv = incoming
    return torch.cat([a[0] for a in acc], dim=2)
