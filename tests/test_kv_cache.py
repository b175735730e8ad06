"""The KV pool and its sequences: pages allocated in one run where possible (K, V are then views, no copies),
scattered pages gathered in order, pages given back, capacity refused; each host's share of a context."""

from __future__ import annotations

import pytest
import torch

from star_mcore.config import InferenceConfig
from star_mcore.inference.kv_cache import KVPool
from star_mcore.inference.modes import context_parallel_mode


def _kv(n, start=0):
    x = torch.arange(start, start + n, dtype=torch.float32).reshape(1, 1, n, 1).expand(1, 2, n, 3).contiguous()
    return x, -x


def _pool(pages=10, page=4):
    return KVPool(num_layers=1, pages=pages, page_size=page, kv_heads=2, head_dim=3, dtype=torch.float32,
                  device=torch.device("cpu"))


def test_a_sequence_in_one_run_of_pages_is_read_as_a_view():
    pool = _pool()
    seq = pool.allocate(10)
    assert seq.pages == [1, 2, 3] and pool.free_pages == 6
    seq.append(0, *_kv(4))
    for i in range(4, 10):
        seq.append(0, *_kv(1, i))
    k, v = seq.get(0, _kv(1)[0])
    assert len(seq) == 10 and torch.equal(k, _kv(10)[0]) and torch.equal(v, _kv(10)[1])
    assert k.data_ptr() == pool.k[0][:, 1].data_ptr()  # a view into the pool
    with pytest.raises(ValueError, match="room for 10"):
        seq.append(0, *_kv(1, 10))


def test_scattered_pages_are_written_and_read_in_order_and_given_back():
    pool = _pool(pages=8)
    a, b, c, d, _ = (pool.allocate(4) for _ in range(5))  # pages 1..5
    pool.release(b)
    pool.release(d)
    pool.allocate(8)  # pages 6, 7: free now 2 and 4, no run of two
    seq = pool.allocate(7)
    assert seq.pages == [2, 4]
    seq.append(0, *_kv(7))
    k, v = seq.get(0, _kv(1)[0])
    assert torch.equal(k, _kv(7)[0]) and torch.equal(v, _kv(7)[1])
    assert torch.equal(seq.flat_positions(3, 2), torch.tensor([11, 16]))  # page 2 offset 3, page 4 offset 0
    pool.release(seq)
    pool.release(a)
    assert pool.free_pages == 3 and seq.pages == []
    with pytest.raises(MemoryError, match="3 free pages, 4 needed"):
        pool.allocate(16)
    assert c.pages == [3]


@pytest.mark.parametrize("mode,partition", [("star", "uniform"), ("star", "balanced"), ("ring", "uniform")])
@pytest.mark.parametrize("n", [1, 250, 1000, 1337])
def test_every_context_token_is_held_by_one_host(mode, partition, n):
    inference = InferenceConfig(context_parallel_mode=mode, block_size=100, anchor_size=50, partition=partition)
    shares = context_parallel_mode(inference).context_shares(n, 4)
    assert sum(shares) == n
    if mode == "star" and partition == "uniform" and n == 1000:
        assert shares == [300, 300, 200, 200]  # contiguous blocks, the remainder spread from host 0


def test_no_sequence_outlives_its_request(gqa_ckpt):
    """The model's attention step holds the request's KV: it is dropped after each request (also a failed
    one), and every page goes back to the pool."""
    from distributed import run_world
    from workers import cache_freed_after_generate

    for rank in run_world(2, cache_freed_after_generate, gqa_ckpt):
        assert rank == [True, True, True, True]
