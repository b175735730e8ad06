"""Star's ``anchor+previous`` phase 1: one p2p hop of K, V per layer from each CP rank to the next, the last
block of a host going to the host whose first block follows it (each TP rank talks to the same TP rank)."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class NeighbourKV:
    """Per layer: :meth:`post` sends this host's last block's K, V to the next CP rank (``send``) and posts the
    receive of the previous CP rank's (``recv_shape``: [2, b, hk, n, d], None = nothing to receive), so the
    transfer runs while this host does its own attention; :meth:`received` waits for it, :meth:`finish` for
    the send (before the layer's K, V buffer may be reused)."""

    def __init__(self, group: dist.ProcessGroup, send: bool, recv_shape: Optional[Tuple[int, ...]],
                 dtype: torch.dtype, device: torch.device) -> None:
        rank = group.rank()
        self.group, self.recv_shape, self.dtype, self.device = group, recv_shape, dtype, device
        self.next = dist.get_global_rank(group, rank + 1) if send else None
        self.prev = dist.get_global_rank(group, rank - 1) if recv_shape is not None else None
        self._sending: List[Tuple[object, Tensor]] = []
        self._recv: Optional[Tuple[object, Tensor]] = None

    def post(self, k: Tensor, v: Tensor) -> None:
        """k, v [b, hk, n, d]: this host's last block (ignored where nothing is sent)."""
        if self.next is not None:
            buf = torch.stack([k, v]).contiguous()
            self._sending.append((dist.isend(buf, self.next, group=self.group), buf))
        if self.prev is not None:
            buf = torch.empty(self.recv_shape, dtype=self.dtype, device=self.device)
            self._recv = (dist.irecv(buf, self.prev, group=self.group), buf)

    def received(self) -> Tuple[Tensor, Tensor]:
        work, buf = self._recv
        work.wait()
        self._recv = None
        return buf[0], buf[1]

    def finish(self) -> None:
        for work, _ in self._sending:
            work.wait()
        self._sending.clear()
