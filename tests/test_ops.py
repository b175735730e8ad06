"""Pure tensor math: kernels with LSE, the merge, the bottom-right composition, layouts, RoPE."""

from __future__ import annotations

import math

import pytest
import torch

from star_mcore.ops import (BACKENDS, attend, attend_prefix_causal, inv_frequencies, math_attention,
                            merge_partials, resolve_backend, ring_chunks, star_block_tokens, star_blocks)
from star_mcore.ops.layout import Span, landmark_spans, ring_chunk_ids


def _qkv(b=1, hq=4, hk=2, sq=7, sk=7, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    v = torch.randn(b, hk, sk, d, generator=g).to(dtype)
    return q, k, v


def _dense(q, k, v, mask):
    """Reference in float64 with an explicit boolean mask [sq, sk]."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(rep, 1), v.double().repeat_interleave(rep, 1)
    s = (q.double() @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, -1) @ v, torch.logsumexp(s, -1)


@pytest.mark.parametrize("name", ["math", "sdpa_flash"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("hk", [1, 2, 4])
def test_cpu_backends_return_exact_out_and_lse(name, causal, hk):
    q, k, v = _qkv(hk=hk, sq=9, sk=9)
    out, lse = attend(BACKENDS[name], q, k, v, causal=causal)
    mask = torch.ones(9, 9, dtype=torch.bool)
    ref_o, ref_l = _dense(q, k, v, mask.tril() if causal else mask)
    assert lse.dtype == torch.float32 and lse.shape == (1, 4, 9)
    assert (out.double() - ref_o).abs().max() < 1e-5
    assert (lse.double() - ref_l).abs().max() < 1e-5


def test_empty_keys_give_a_neutral_partial():
    q, k, v = _qkv(sk=0)
    out, lse = attend(math_attention, q, k, v)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


def test_causal_needs_square():
    q, k, v = _qkv(sq=3, sk=5)
    with pytest.raises(ValueError, match="sq == sk"):
        attend(math_attention, q, k, v, causal=True)


def test_resolve_backend():
    assert resolve_backend("auto", torch.device("cpu"), torch.float32) is BACKENDS["sdpa_flash"]
    with pytest.raises(ValueError, match="needs a CUDA device"):
        resolve_backend("sdpa_cudnn", torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match="unknown attention backend 'nope'"):
        resolve_backend("nope", torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("splits", [[3, 4, 5], [12], [1, 0, 11], [0, 12, 0]])
def test_merge_of_disjoint_key_sets_is_exact(splits):
    q, k, v = _qkv(sq=5, sk=12, seed=2)
    outs, lses, start = [], [], 0
    for n in splits:
        o, l = attend(math_attention, q, k[:, :, start:start + n], v[:, :, start:start + n])
        outs.append(o), lses.append(l)
        start += n
    out, lse = merge_partials(torch.stack(outs), torch.stack(lses))
    ref_o, ref_l = _dense(q, k, v, torch.ones(5, 12, dtype=torch.bool))
    assert (out.double() - ref_o).abs().max() < 1e-5
    assert (lse.double() - ref_l).abs().max() < 1e-5


def test_merge_is_stable_for_huge_lse_and_all_empty():
    o = torch.randn(2, 1, 1, 3, 4)
    l = torch.tensor([1000.0, 1000.0 + math.log(3)]).view(2, 1, 1, 1).expand(2, 1, 1, 3)
    out, lse = merge_partials(o, l)
    assert torch.allclose(out, 0.25 * o[0] + 0.75 * o[1], atol=2e-4)  # lse near 1000 carries fp32 rounding of 6e-5
    assert torch.allclose(lse, torch.full_like(lse, 1000.0 + math.log(4)))
    out, lse = merge_partials(torch.zeros(2, 1, 1, 3, 4), torch.full((2, 1, 1, 3), -math.inf))
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse)) and not torch.isnan(out).any()


def test_prefix_then_causal_self_is_a_bottom_right_mask():
    q, k, v = _qkv(sq=4, sk=10, seed=4)
    out, lse = attend_prefix_causal(math_attention, q, k[:, :, :6], v[:, :, :6], k[:, :, 6:], v[:, :, 6:])
    mask = torch.ones(4, 10, dtype=torch.bool).tril(diagonal=6)  # query i sees keys 0 .. 6 + i
    ref_o, ref_l = _dense(q, k, v, mask)
    assert (out.double() - ref_o).abs().max() < 1e-5
    assert (lse.double() - ref_l).abs().max() < 1e-5


@pytest.mark.parametrize("L,b,P", [(37, 8, 3), (64, 8, 4), (10, 128, 4), (3, 8, 4), (16, 16, 1)])
def test_star_blocks_cover_the_context_contiguously(L, b, P):
    hosts = star_blocks(L, b, P)
    assert len(hosts) == P
    flat = [blk for h in hosts for blk in h]
    assert [x.start for x in flat] == list(range(0, L, b))
    assert all(len(x) == b for x in flat[:-1]) and 0 < len(flat[-1]) <= b
    assert flat[-1].end == L
    counts = [len(h) for h in hosts]
    assert max(counts) - min(counts) <= 1 and counts == sorted(counts, reverse=True)


def test_balanced_partition_enlarges_block_zero():
    hosts = star_blocks(40, 8, 2, first_block_size=12)  # block + anchor = 8 + 4
    flat = [(b.start, b.end) for h in hosts for b in h]
    assert flat == [(0, 12), (12, 20), (20, 28), (28, 36), (36, 40)]
    assert [len(h) for h in hosts] == [3, 2]
    assert [(b.start, b.end) for h in star_blocks(10, 8, 2, first_block_size=12) for b in h] == [(0, 10)]


def test_star_block_tokens_prepend_the_anchor_with_its_own_positions():
    ctx = torch.arange(100, 140)
    blocks = star_blocks(40, 16, 2)
    ids, pos, a = star_block_tokens(ctx, blocks[0][0], 6)
    assert a == 0 and ids.tolist() == list(range(100, 116)) and pos.tolist() == list(range(16))
    ids, pos, a = star_block_tokens(ctx, blocks[1][0], 6)  # block 2 = [32, 40)
    assert a == 6
    assert ids.tolist() == list(range(100, 106)) + list(range(132, 140))
    assert pos.tolist() == list(range(6)) + list(range(32, 40))
    ids, pos, a = star_block_tokens(ctx, blocks[0][1], 0)
    assert a == 0 and pos.tolist() == list(range(16, 32))


def test_a_long_anchor_stops_at_the_block_and_landmarks_sit_between():
    ctx = torch.arange(100, 164)
    block = Span(16, 24)
    ids, pos, n = star_block_tokens(ctx, block, 40)  # anchor longer than the context before the block
    assert n == 16 and pos.tolist() == list(range(24))
    # 2 landmarks of 3 tokens in [4, 40): the stretch cut in two equal parts, the last 3 tokens of each
    assert landmark_spans(40, 4, 2, 3) == [Span(19, 22), Span(37, 40)]
    assert landmark_spans(10, 4, 2, 3) == [Span(4, 10)]  # they would cover it: the whole stretch
    assert landmark_spans(4, 4, 2, 3) == [] and landmark_spans(8, 0, 1, 2) == [Span(6, 8)]
    ids, pos, n = star_block_tokens(ctx, Span(40, 48), 4, landmark_spans(40, 4, 2, 3))
    assert n == 10 and pos.tolist() == [0, 1, 2, 3, 19, 20, 21, 37, 38, 39] + list(range(40, 48))
    assert ids.tolist() == [100 + p for p in pos.tolist()]


@pytest.mark.parametrize("L,P", [(64, 4), (37, 3), (10, 4), (3, 4)])
def test_ring_chunks_partition_and_balance(L, P):
    chunks = ring_chunks(L, P)
    spans = sorted((s for pair in chunks for s in pair), key=lambda s: s.start)
    assert spans[0].start == 0 and spans[-1].end == L
    assert all(a.end == b.start for a, b in zip(spans, spans[1:]))
    for r, pair in enumerate(chunks):
        ids = ring_chunk_ids(r, P)
        assert [s.start for s in pair] == [spans[i].start for i in ids]

    def work(pair):  # causal attention pairs: a token at position t sees t + 1 keys
        return sum(t + 1 for s in pair for t in range(s.start, s.end))

    loads = [work(p) for p in chunks]
    if L >= 2 * P:
        assert max(loads) / min(loads) < 1.35  # uniform contiguous split would be about 2P-1 times worse


def test_llama3_rope_matches_transformers():
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}
    cfg = LlamaConfig(hidden_size=128, num_attention_heads=4, rope_theta=500000.0, rope_scaling=scaling)
    ref, scale = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    assert scale == 1.0
    assert torch.allclose(inv_frequencies(32, 500000.0, scaling), ref, rtol=1e-6, atol=0)


def test_unknown_rope_type_is_refused():
    with pytest.raises(ValueError, match="unsupported rope_scaling type 'yarn'"):
        inv_frequencies(16, 10000.0, {"rope_type": "yarn", "factor": 4.0})
