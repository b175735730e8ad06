"""Phase 2's batched step kernel over a paged KV pool: every slot's output equals one softmax over the union of
its groups' keys (a shared context read once for several slots, each slot's own tokens apart), for the torch
reference and the Triton kernel (in Triton's interpreter on CPU), GQA, pages out of order, empty groups and
slots in no group."""

from __future__ import annotations

import math

import pytest
import torch

from star_mcore.ops.attention import math_attention
from star_mcore.ops.paged_attention import PagedLayout, paged_attention_reference, paged_attention_triton
from star_mcore.ops.triton_support import triton_available

HK, G_Q, D, PAGE, PAGES = 2, 3, 16, 4, 40


def _case(seed=0, dtype=torch.float32):
    """5 slots: slots 0, 1, 3 share context A (10 keys), slot 2 has context B (7 keys), slot 4 is idle; every
    busy slot has its own tokens (1-6 keys) too. Pages are scattered over the pool, not in order."""
    g = torch.Generator().manual_seed(seed)
    k_pool = torch.randn(HK, PAGES, PAGE, D, generator=g).to(dtype)
    v_pool = torch.randn(HK, PAGES, PAGE, D, generator=g).to(dtype)
    k_pool[:, 0], v_pool[:, 0] = float("nan"), float("nan")  # scratch: never read as a key
    q = torch.randn(5, HK, G_Q, D, generator=g).to(dtype)
    perm = (torch.randperm(PAGES - 1, generator=g) + 1).tolist()
    seqs = {"A": 10, "B": 7, "own0": 3, "own1": 1, "own2": 6, "own3": 4}
    pages = {name: [perm.pop() for _ in range(-(-(n + 3) // PAGE))] for name, n in seqs.items()}  # room to grow
    groups = [("A", [0, 1, 3], 0), ("B", [2], 0), ("own0", [0], 1), ("own1", [1], 1), ("own2", [2], 1),
              ("own3", [3], 1), (None, [], 0)]  # the last: a padding group (no keys, no members)
    W, M = 4, 3
    table = torch.zeros(len(groups), W, dtype=torch.int32)
    lens = torch.zeros(len(groups), dtype=torch.int32)
    members = torch.full((len(groups), M), -1, dtype=torch.long)
    part = torch.zeros(len(groups), dtype=torch.long)
    for i, (name, mem, pt) in enumerate(groups):
        if name:
            table[i, : len(pages[name])] = torch.tensor(pages[name], dtype=torch.int32)
            lens[i] = seqs[name]
        members[i, : len(mem)] = torch.tensor(mem, dtype=torch.long)
        part[i] = pt
    layout = PagedLayout(table, lens, members, part, n_parts=2, splits=3)

    def keys(name):
        flat = torch.tensor([p * PAGE + o for p in pages[name] for o in range(PAGE)][: seqs[name]])
        return k_pool.reshape(HK, -1, D)[:, flat], v_pool.reshape(HK, -1, D)[:, flat]

    expected = []
    for slot, ctx in [(0, "A"), (1, "A"), (2, "B"), (3, "A")]:
        ka, va = keys(ctx)
        ko, vo = keys(f"own{slot}")
        k, v = torch.cat([ka, ko], 1), torch.cat([va, vo], 1)
        out, lse = math_attention(q[slot].reshape(1, HK * G_Q, 1, D), k[None], v[None], scale=D ** -0.5)
        expected.append((out.float().reshape(HK, G_Q, D), lse.reshape(HK, G_Q)))
    return q, k_pool, v_pool, layout, expected


KERNELS = [paged_attention_reference]
if triton_available():
    KERNELS.append(paged_attention_triton)


@pytest.mark.parametrize("kernel", KERNELS, ids=lambda k: k.__name__)
def test_each_slot_gets_one_softmax_over_its_groups(kernel):
    q, k_pool, v_pool, layout, expected = _case()
    out, lse = kernel(q, k_pool, v_pool, layout, D ** -0.5)
    assert out.shape == (5, HK, G_Q, D) and lse.shape == (5, HK, G_Q)
    for slot, (o, l) in enumerate(expected):
        torch.testing.assert_close(out[slot], o, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(lse[slot], l, atol=1e-5, rtol=1e-5)
    assert torch.all(out[4] == 0) and torch.all(lse[4] == -math.inf)  # the idle slot: a neutral partial


@pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
def test_triton_and_reference_agree_as_lengths_grow():
    q, k_pool, v_pool, layout, _ = _case(seed=1)
    for extra in range(3):  # the own groups grow by a key per step, as in decoding; the launch stays the same
        layout.lens[2:6] += 1
        a = paged_attention_reference(q, k_pool, v_pool, layout, 0.3)
        b = paged_attention_triton(q, k_pool, v_pool, layout, 0.3)
        torch.testing.assert_close(a[0], b[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(a[1], b[1], atol=1e-5, rtol=1e-5)
