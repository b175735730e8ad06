"""Shared anchor: the anchor's per-layer K and V go from the hosts that encode it to the other hosts, instead of
every host re-encoding the anchor (same numbers, less work). The anchor lies in block 0 (CP rank 0 sends it), or
with ``star_context=long_anchor`` in the first blocks: then each of their hosts sends its piece."""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class AnchorBroadcast:
    """Per layer, one broadcast over the CP group for each piece of the anchor, in the pieces' order (each TP
    rank talks to the same TP rank of the others). ``pieces``: (CP rank that holds it, tokens), in context order.

    A rank holding a piece issues the layer's broadcasts when it has its piece (:meth:`post`); the others post
    layer l+1's as soon as layer l's have arrived, so the transfer overlaps their own layer's work (norm, QKV
    projection) instead of starting when they need it.
    """

    def __init__(self, group: dist.ProcessGroup, num_layers: int, pieces: Sequence[Tuple[int, int]],
                 head_shape: Tuple[int, int, int], dtype: torch.dtype, device: torch.device) -> None:
        self.group, self.num_layers, self.pieces = group, num_layers, list(pieces)
        self.head_shape, self.dtype, self.device = head_shape, dtype, device  # [b, hk, d]
        self.rank = group.rank()
        self.sends_a_piece = any(r == self.rank for r, _ in self.pieces)
        self._posted: Dict[int, List[Tuple[object, Tensor]]] = {}

    def post(self, layer: int, own: Optional[Tuple[Tensor, Tensor]] = None) -> None:
        """Issue ``layer``'s broadcasts (once); ``own``: this rank's piece (k, v [b, hk, n, d]), if it holds one."""
        if layer in self._posted:
            return
        b, hk, d = self.head_shape
        works = []
        for r, n in self.pieces:
            buf = (torch.stack(own).contiguous() if r == self.rank else
                   torch.empty((2, b, hk, n, d), dtype=self.dtype, device=self.device))  # [k; v]
            src = dist.get_global_rank(self.group, r)
            works.append((dist.broadcast(buf, src=src, group=self.group, async_op=True), buf))
        self._posted[layer] = works

    def get(self, layer: int, upto: Optional[int] = None) -> List[Tuple[Tensor, Tensor]]:
        """The first ``upto`` pieces of ``layer`` (default all), waited for (this rank's own is in hand)."""
        self.post(layer)
        works = self._posted[layer][:upto]
        for (r, _), (work, _) in zip(self.pieces, works):
            if r != self.rank:
                work.wait()
        if upto is None and not self.sends_a_piece and layer + 1 < self.num_layers:
            self.post(layer + 1)
        return [(buf[0], buf[1]) for _, buf in works]

    def finish(self) -> None:
        for works in self._posted.values():
            for work, _ in works:
                work.wait()
        self._posted.clear()
