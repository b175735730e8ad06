"""The KV cache of one host: per layer, the (post-RoPE) K and V of the context tokens it holds, plus the
query and generated tokens on the query host."""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

Tensor = torch.Tensor


class KVCache:
    """Per-layer K and V, each [b, hk, n, d], grown in place.

    ``reserve`` is the number of tokens the host will hold in all (its context share, plus the query and
    the generated tokens on the query host): the first append allocates that much, so a long context is
    never copied into a larger buffer. Past it, capacity doubles (appends stay O(1) amortised).
    """

    def __init__(self, num_layers: int, reserve: int = 0) -> None:
        self._k: List[Optional[Tensor]] = [None] * num_layers
        self._v: List[Optional[Tensor]] = [None] * num_layers
        self._len = [0] * num_layers
        self._reserve = reserve

    def __len__(self) -> int:
        """Tokens held (the same in every layer once a forward pass is complete)."""
        return self._len[0]

    def append(self, layer: int, k: Tensor, v: Tensor) -> None:
        n, need = self._len[layer], self._len[layer] + k.shape[2]
        buf = self._k[layer]
        if buf is None:
            shape = k.shape[:2] + (max(need, self._reserve),) + k.shape[3:]
            self._k[layer], self._v[layer] = k.new_empty(shape), v.new_empty(shape)
        elif buf.shape[2] < need:
            self._grow(layer, max(need, 2 * buf.shape[2]))
        self._k[layer][:, :, n:need] = k
        self._v[layer][:, :, n:need] = v
        self._len[layer] = need

    def _grow(self, layer: int, capacity: int) -> None:
        n, old_k, old_v = self._len[layer], self._k[layer], self._v[layer]
        shape = old_k.shape[:2] + (capacity,) + old_k.shape[3:]
        self._k[layer], self._v[layer] = old_k.new_empty(shape), old_v.new_empty(shape)
        self._k[layer][:, :, :n] = old_k[:, :, :n]
        self._v[layer][:, :, :n] = old_v[:, :, :n]

    def reserve(self, n: int) -> None:
        """Room for ``n`` tokens in all, before a phase whose shapes are static: a smaller buffer moves to one
        of exactly ``n`` (its tokens kept); layers not yet allocated will start at ``n``."""
        self._reserve = max(self._reserve, n)
        for layer, buf in enumerate(self._k):
            if buf is not None and buf.shape[2] < n:
                self._grow(layer, n)

    def set_length(self, n: int) -> None:
        """Declare ``n`` tokens held in every layer (at most the capacity): the static decode step writes its
        tokens through device-side indices, so the host states the count once the steps are done."""
        if any(k is not None and n > k.shape[2] for k in self._k) or (n and self._k[0] is None):
            raise ValueError(f"cannot hold {n} tokens: beyond the cache's capacity")
        self._len = [n] * len(self._len)

    def buffers(self, layer: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        """The whole K, V buffers [b, hk, capacity, d] of ``layer`` (past the held tokens: unwritten memory);
        an empty pair shaped like ``like`` where nothing was ever held."""
        if self._k[layer] is None:
            empty = like.new_empty(like.shape[:2] + (0,) + like.shape[3:])
            return empty, empty
        return self._k[layer], self._v[layer]

    def get(self, layer: int, like: Tensor) -> Tuple[Tensor, Tensor]:
        """Views of the held K, V; an empty [b, hk, 0, d] pair shaped like ``like`` if nothing is held."""
        k, v = self.buffers(layer, like)
        n = self._len[layer]
        return k[:, :, :n], v[:, :, :n]
