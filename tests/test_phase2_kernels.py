"""Phase 2's kernels. The batched step's paged attention (the torch reference, and the Triton split-KV kernel,
run by Triton's interpreter on CPU: conftest sets TRITON_INTERPRET): every slot's output equals one float64
softmax over the union of its groups' keys (a shared context read once for several slots, each slot's own tokens
apart), with GQA, pages out of order, long groups over several splits, an empty group, an idle slot and NaN in
the scratch page; the fused merge against the torch merge; the fused RoPE against the rotate-half formula. On a
GPU machine the same tests run compiled on CUDA; bf16 is checked there (tests/test_gpu.py)."""

from __future__ import annotations

import math

import pytest
import torch

from star_mcore.ops.merge import merge_partials
from star_mcore.ops.paged_attention import (PagedLayout, paged_attention_reference, paged_attention_triton,
                                            resolve_paged_kernel, split_count)
from star_mcore.ops.triton_support import triton_available

# On a GPU machine the same tests run the compiled kernels on CUDA tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
KERNELS = [pytest.param(paged_attention_reference, id="reference"),
           pytest.param(paged_attention_triton, id="triton", marks=needs_triton)]


def _case(hk, gq, d, page, lengths, seed, splits=3, grow=0, scattered=True):
    """Slots 0, 1, 3 share context A, slot 2 has context B, slot 4 is idle; every busy slot has its own tokens
    too. ``lengths``: (A, B, own0..own3). Pages are scattered over the pool (else each sequence's pages are one
    run, in order); page 0 (scratch) holds NaN."""
    g = torch.Generator().manual_seed(seed)
    names = ["A", "B", "own0", "own1", "own2", "own3"]
    seqs = dict(zip(names, lengths))
    n_pages = 2 + sum(-(-(n + grow) // page) for n in seqs.values())
    k_pool = torch.randn(hk, n_pages, page, d, generator=g)
    v_pool = torch.randn(hk, n_pages, page, d, generator=g)
    k_pool[:, 0], v_pool[:, 0] = float("nan"), float("nan")
    q = torch.randn(5, hk, gq, d, generator=g)
    perm = (torch.randperm(n_pages - 1, generator=g) + 1).tolist() if scattered else list(range(n_pages - 1, 0, -1))
    pages = {n: [perm.pop() for _ in range(-(-(seqs[n] + grow) // page))] for n in names}
    groups = [("A", [0, 1, 3], 0), ("B", [2], 0), ("own0", [0], 1), ("own1", [1], 1), ("own2", [2], 1),
              ("own3", [3], 1), (None, [], 0)]  # the last: a padding group (no keys, no members)
    W, M = max(len(p) for p in pages.values()), 4
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
    layout = PagedLayout(table.to(DEV), lens.to(DEV), members.to(DEV), part.to(DEV), n_parts=2, splits=splits)
    return q.to(DEV), k_pool.to(DEV), v_pool.to(DEV), layout, pages


def _expected(q, k_pool, v_pool, layout, pages, scale):
    """Per busy slot: one float64 softmax over its context's and its own keys."""
    hk, _, page, d = k_pool.shape
    lens = dict(zip(["A", "B", "own0", "own1", "own2", "own3"], layout.lens.tolist()))

    def keys(name):
        flat = torch.tensor([p * page + o for p in pages[name] for o in range(page)][: lens[name]], device=q.device)
        return k_pool.reshape(hk, -1, d)[:, flat].double(), v_pool.reshape(hk, -1, d)[:, flat].double()

    out = {}
    for slot, ctx in [(0, "A"), (1, "A"), (2, "B"), (3, "A")]:
        (ka, va), (ko, vo) = keys(ctx), keys(f"own{slot}")
        k, v = torch.cat([ka, ko], 1), torch.cat([va, vo], 1)  # [hk, n, d]
        s = torch.einsum("hgd,hnd->hgn", q[slot].double(), k) * scale
        out[slot] = (torch.softmax(s, -1) @ v, torch.logsumexp(s, -1))
    return out


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is meant
@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("scattered", [True, False], ids=["scattered", "runs"])
@pytest.mark.parametrize("hk,gq,d,page,lengths", [
    (2, 3, 16, 4, (10, 7, 3, 1, 6, 4)),           # GQA 3, small pages
    (2, 2, 16, 16, (700, 333, 5, 1, 17, 40)),     # long groups: several splits, some empty
    (1, 8, 32, 8, (1, 300, 2, 2, 2, 2)),           # MQA; a context of one key
    (3, 1, 24, 5, (64, 64, 9, 1, 3, 3)),           # MHA, head dim not a power of two, odd page size
    (3, 3, 64, 64, (1030, 200, 70, 1, 1, 130)),    # SmolLM2's heads; lengths end inside a tile
])
def test_each_slot_gets_one_softmax_over_its_groups(kernel, scattered, hk, gq, d, page, lengths):
    q, k_pool, v_pool, layout, pages = _case(hk, gq, d, page, lengths, seed=sum(lengths), scattered=scattered)
    out, lse = kernel(q, k_pool, v_pool, layout, d ** -0.5)
    assert out.dtype == torch.float32 and out.shape == (5, hk, gq, d) and lse.shape == (5, hk, gq)
    for slot, (o, l) in _expected(q, k_pool, v_pool, layout, pages, d ** -0.5).items():
        assert (out[slot].double() - o).abs().max() < 1e-5, slot
        assert (lse[slot].double() - l).abs().max() < 1e-5, slot
    assert torch.all(out[4] == 0) and torch.all(lse[4] == -math.inf)  # the idle slot: a neutral partial


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
def test_triton_kernel_follows_lengths_that_grow_on_the_device():
    """The launch stays the same (static shapes) while the own groups grow by a key per step, as in decoding."""
    q, k_pool, v_pool, layout, pages = _case(2, 2, 16, 4, (40, 9, 3, 1, 6, 4), seed=3, splits=4, grow=3)
    for _ in range(3):
        layout.lens[2:6] += 1
        out, lse = paged_attention_triton(q, k_pool, v_pool, layout, 0.3)
        for slot, (o, l) in _expected(q, k_pool, v_pool, layout, pages, 0.3).items():
            assert (out[slot].double() - o).abs().max() < 1e-5
            assert (lse[slot].double() - l).abs().max() < 1e-5


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")
@pytest.mark.parametrize("gq,rows,page", [(3, 16, 8), (8, 16, 128), (2, 32, 8)])
def test_triton_kernel_cuts_many_members_into_chunks(gq, rows, page):
    """Twelve slots over one shared context, more query rows than one program holds: the members are cut
    into chunks (with GQA 3 a chunk of 16 rows holds 5 slots and one idle row); every slot still gets the
    reference's softmax over the shared keys and its own. Pages of 128 keys hold whole key tiles (one page id
    a tile), pages of 8 do not (a page id per key)."""
    g = torch.Generator().manual_seed(gq * rows)
    hk, d, S, n = 2, 16, 12, 150
    own = [1 + (s * 5) % 11 for s in range(S)]
    pages = -(-n // page) + S * 2 + 1
    k_pool, v_pool = torch.randn(2, hk, pages, page, d, generator=g)
    k_pool[:, 0], v_pool[:, 0] = float("nan"), float("nan")
    q = torch.randn(S, hk, gq, d, generator=g)
    perm = (torch.randperm(pages - 1, generator=g) + 1).tolist()
    G = S + 1
    table = torch.zeros(G, -(-n // page), dtype=torch.int32)
    lens = torch.tensor([n] + own, dtype=torch.int32)
    members = torch.full((G, S), -1, dtype=torch.long)
    members[0] = torch.arange(S)
    members[1:, 0] = torch.arange(S)
    part = torch.tensor([0] + [1] * S)
    for j in range(G):
        table[j, : -(-int(lens[j]) // page)] = torch.tensor([perm.pop() for _ in range(-(-int(lens[j]) // page))],
                                                           dtype=torch.int32)
    layout = PagedLayout(table.to(DEV), lens.to(DEV), members.to(DEV), part.to(DEV), n_parts=2, splits=2)
    args = (q.to(DEV), k_pool.to(DEV), v_pool.to(DEV), layout, d ** -0.5)
    out, lse = paged_attention_triton(*args, rows_per_program=rows)
    ref_out, ref_lse = paged_attention_reference(*args)
    assert (out - ref_out).abs().max() < 1e-5 and (lse - ref_lse).abs().max() < 1e-5


def test_paged_kernel_choice_and_split_counts():
    assert resolve_paged_kernel(torch.device("cpu")) is paged_attention_reference
    assert split_count(1, 8, 132) == 64 and split_count(16, 8, 132) == 4 and split_count(64, 8, 132) == 1


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is meant
@pytest.mark.parametrize("n", [1, 2, 5])
def test_fused_merge_equals_torch_merge(n):
    from star_mcore.ops.triton_kernels import merge_rows

    g = torch.Generator().manual_seed(n)
    outs = torch.randn(n, 2, 3, 4, 24, generator=g)
    lses = torch.randn(n, 2, 3, 4, generator=g) * 30
    lses[0, 0, 0, 0] = -float("inf")  # one empty partial
    if n > 1:
        lses[:, 1, 1, 1] = -float("inf")  # a row where every partial is empty
    ref_o, ref_l = merge_partials(outs, lses)  # the torch formula (CPU tensors)
    out, lse = merge_rows(outs.reshape(n, -1, 24).to(DEV), lses.reshape(n, -1).to(DEV))
    out, lse = out.cpu(), lse.cpu()
    assert torch.allclose(out.reshape(ref_o.shape), ref_o, atol=1e-6, rtol=1e-5)
    finite = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse.reshape(ref_l.shape)), finite)
    assert torch.allclose(lse.reshape(ref_l.shape)[finite], ref_l[finite], atol=1e-5)


@needs_triton
@pytest.mark.parametrize("s,h,d", [(1, 32, 128), (37, 9, 64), (5, 3, 24)])
def test_fused_rope_equals_the_rotate_half_formula(s, h, d):
    """The Triton RoPE on q as mcore hands it over (a strided view into the fused QKV projection) against the
    rotate-half formula in float64; positions far apart (large angles)."""
    from star_mcore.ops.rope import inv_frequencies, rope_cos_sin
    from star_mcore.ops.triton_kernels import rope_rotate

    g = torch.Generator().manual_seed(s + h)
    qkv = torch.randn(s, 1, h + 2, d, generator=g).to(DEV)
    x = qkv[:, :, :h]  # not contiguous over heads, like mcore's query
    pos = torch.randint(0, 1 << 17, (s,), generator=g)
    cos, sin = rope_cos_sin(pos, inv_frequencies(d, 500000.0).to(DEV))
    out = rope_rotate(x, cos, sin)
    xd, c, si = x.double(), cos.double()[:, None, None, :], sin.double()[:, None, None, :]
    ref = torch.cat([xd[..., : d // 2] * c - xd[..., d // 2:] * si, xd[..., d // 2:] * c + xd[..., : d // 2] * si], -1)
    assert out.is_contiguous() and out.shape == x.shape
    assert (out.double() - ref).abs().max() < 1e-5
