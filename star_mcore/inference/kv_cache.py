"""One host's KV storage: a pool of fixed-size pages allocated once, and the sequences that hold pages of it (a
context's share on this host, a request's own tokens on the query host). One protocol for every phase: phase 1,
the query pass and the eager decode step append through :meth:`KVSequence.append`; the static decode step writes
through the device-side positions of :meth:`KVSequence.flat_positions`; every reader sees the same pages."""

from __future__ import annotations

from typing import List, Tuple

import torch

Tensor = torch.Tensor


class KVPool:
    """Per layer K and V [hk, pages, page_size, d] (this TP rank's KV heads). Page 0 is scratch: the static step
    writes the K, V of idle slots there, and no sequence ever owns it."""

    def __init__(self, num_layers: int, pages: int, page_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        if pages < 2:
            raise ValueError("a KV pool needs at least 2 pages (page 0 is scratch)")
        shape = (kv_heads, pages, page_size, head_dim)
        self.k = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.v = [torch.empty(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.page_size, self.pages = page_size, pages
        self._free = list(range(1, pages))  # ascending

    @property
    def free_pages(self) -> int:
        return len(self._free)

    def pages_for(self, tokens: int) -> int:
        return -(-tokens // self.page_size)

    def allocate(self, tokens: int) -> "KVSequence":
        """A sequence with room for ``tokens``: one run of consecutive pages where there is one (its K, V are
        then views, not copies, for the phase-1 kernels), else the lowest free pages."""
        n = self.pages_for(tokens)
        if n > len(self._free):
            raise MemoryError(f"the KV pool has {len(self._free)} free pages, {n} needed")
        free = self._free
        if n == 0:
            return KVSequence(self, [], tokens)
        for i in range(len(free) - n + 1):
            if free[i + n - 1] - free[i] == n - 1:
                pages = free[i:i + n]
                del free[i:i + n]
                break
        else:
            pages, self._free = free[:n], free[n:]
        return KVSequence(self, pages, tokens)

    def release(self, seq: "KVSequence") -> None:
        if seq.pages:
            self._free = sorted(self._free + seq.pages)
            seq.pages = []


class KVSequence:
    """A sequence's pages in the pool and the tokens it holds per layer (the same in every layer once a forward
    pass is complete)."""

    def __init__(self, pool: KVPool, pages: List[int], capacity: int) -> None:
        self.pool, self.pages, self.capacity = pool, pages, capacity
        self._len = [0] * len(pool.k)
        p = pool.page_size
        self._contiguous = all(b == a + 1 for a, b in zip(pages, pages[1:]))
        self._pos = (torch.tensor(pages, dtype=torch.long)[:, None] * p + torch.arange(p)).reshape(-1)

    def __len__(self) -> int:
        return self._len[0]

    def flat_positions(self, start: int, n: int) -> Tensor:
        """Pool positions (page * page_size + offset, CPU int64) of tokens [start, start + n)."""
        if start + n > self.capacity:
            raise ValueError(f"cannot hold {start + n} tokens: the sequence has room for {self.capacity}")
        return self._pos[start:start + n]

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        """k, v [1, hk, n, d]: the next n tokens of ``layer``."""
        n0, n = self._len[layer], k.shape[2]
        pk, pv = self._flat(layer)
        if self._contiguous:
            start = self.pages[0] * self.pool.page_size + n0 if self.pages else 0
            if n0 + n > self.capacity:
                raise ValueError(f"cannot hold {n0 + n} tokens: the sequence has room for {self.capacity}")
            pk[:, start:start + n] = k[0]
            pv[:, start:start + n] = v[0]
        else:
            pos = self.flat_positions(n0, n).to(k.device)
            pk.index_copy_(1, pos, k[0])
            pv.index_copy_(1, pos, v[0])
        self._len[layer] = n0 + n

    def set_length(self, n: int) -> None:
        """Declare ``n`` tokens held in every layer: the static step writes through device-side positions, so
        the host states the count after it."""
        if n > self.capacity:
            raise ValueError(f"cannot hold {n} tokens: the sequence has room for {self.capacity}")
        self._len = [n] * len(self._len)

    def get(self, layer: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        """The held K, V [1, hk, n, d] of ``layer``: views where the pages are one run, else gathered copies;
        an empty pair shaped like ``like`` if nothing is held."""
        n = self._len[layer]
        if n == 0:
            empty = like.new_empty(like.shape[:2] + (0,) + like.shape[3:])
            return empty, empty
        pk, pv = self._flat(layer)
        if self._contiguous:
            start = self.pages[0] * self.pool.page_size
            return pk[None, :, start:start + n], pv[None, :, start:start + n]
        pos = self.flat_positions(0, n).to(pk.device)
        return pk[None].index_select(2, pos), pv[None].index_select(2, pos)

    def _flat(self, layer: int) -> Tuple[Tensor, Tensor]:
        k, v = self.pool.k[layer], self.pool.v[layer]
        return k.view(k.shape[0], -1, k.shape[-1]), v.view(v.shape[0], -1, v.shape[-1])
