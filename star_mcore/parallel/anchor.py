"""Shared anchor: the anchor's per-layer K and V go from the host that encodes block 0 (CP rank 0) to the
other hosts, instead of every host re-encoding the anchor (same numbers, less work)."""

from __future__ import annotations

from typing import Dict, List, Tuple

import torch
import torch.distributed as dist

Tensor = torch.Tensor


class AnchorBroadcast:
    """One broadcast per layer over the CP group (each TP rank talks to the same TP rank of the others).

    Receivers post layer l+1's receive as soon as layer l's arrives, so the transfer overlaps their own
    layer's work (norm, QKV projection) instead of starting when they need it.
    """

    def __init__(self, group: dist.ProcessGroup, num_layers: int, shape: Tuple[int, ...], dtype: torch.dtype,
                 device: torch.device) -> None:
        self.group, self.num_layers = group, num_layers
        self.shape, self.dtype, self.device = (2,) + tuple(shape), dtype, device  # [k; v] x [b, hk, a, d]
        self.src = dist.get_global_rank(group, 0)
        self._posted: Dict[int, Tuple[object, Tensor]] = {}
        self._sending: List[Tuple[object, Tensor]] = []

    def send(self, k: Tensor, v: Tensor) -> None:
        """On CP rank 0, in layer order."""
        buf = torch.stack([k, v]).contiguous()
        self._sending.append((dist.broadcast(buf, src=self.src, group=self.group, async_op=True), buf))

    def _post(self, layer: int) -> None:
        buf = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        self._posted[layer] = (dist.broadcast(buf, src=self.src, group=self.group, async_op=True), buf)

    def recv(self, layer: int) -> Tuple[Tensor, Tensor]:
        """On the other CP ranks, in layer order."""
        if layer not in self._posted:
            self._post(layer)
        work, buf = self._posted.pop(layer)
        work.wait()
        if layer + 1 < self.num_layers:
            self._post(layer + 1)
        return buf[0], buf[1]

    def finish(self) -> None:
        for work, _ in self._sending:
            work.wait()
        self._sending.clear()
