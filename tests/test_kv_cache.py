"""The KV cache's storage: one allocation of the host's final size, and the engine's reservation per host."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from star_mcore.config import InferenceConfig
from star_mcore.inference.engine import Engine
from star_mcore.inference.kv_cache import KVCache


def _kv(n, start=0):
    x = torch.arange(start, start + n, dtype=torch.float32).reshape(1, 1, n, 1).expand(1, 2, n, 3).contiguous()
    return x, -x


def test_reserved_cache_is_allocated_once():
    cache = KVCache(1, reserve=10)
    cache.append(0, *_kv(4))
    ptr = cache.get(0, _kv(1)[0])[0].data_ptr()
    for i in range(4, 10):
        cache.append(0, *_kv(1, i))
    k, v = cache.get(0, _kv(1)[0])
    assert k.data_ptr() == ptr and len(cache) == 10
    assert torch.equal(k, _kv(10)[0]) and torch.equal(v, _kv(10)[1])


def test_cache_grows_past_its_reservation_and_keeps_its_contents():
    cache = KVCache(1, reserve=3)
    cache.append(0, *_kv(3))
    ptr = cache.get(0, _kv(1)[0])[0].data_ptr()
    cache.append(0, *_kv(2, 3))
    k, v = cache.get(0, _kv(1)[0])
    assert k.data_ptr() != ptr and torch.equal(k, _kv(5)[0]) and torch.equal(v, _kv(5)[1])


@pytest.mark.parametrize("mode,partition", [("star", "uniform"), ("star", "balanced"), ("ring", "uniform")])
@pytest.mark.parametrize("n", [1, 250, 1000, 1337])
def test_engine_reserves_each_hosts_share_of_the_context(mode, partition, n):
    shares = []
    for rank in range(4):
        groups = SimpleNamespace(cp_size=4, cp_rank=rank, device=torch.device("cpu"))
        inference = InferenceConfig(context_parallel_mode=mode, block_size=100, anchor_size=50, partition=partition)
        shares.append(Engine(SimpleNamespace(dtype=torch.float32), groups, inference).context_share(n))
    assert sum(shares) == n
    if mode == "star" and partition == "uniform" and n == 1000:
        assert shares == [300, 300, 200, 200]  # contiguous blocks, the remainder spread from host 0


def test_no_cache_outlives_its_request(gqa_ckpt):
    """The model's attention step holds the request's KV cache: it is dropped after each request (also a
    failed one), or the next request's phase 1 would run beside the last one's whole cache."""
    from distributed import run_world
    from workers import cache_freed_after_generate

    for rank in run_world(2, cache_freed_after_generate, gqa_ckpt):
        assert rank == [True, True, True, True]
