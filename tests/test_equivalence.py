"""star | ring | none on real gloo worlds (CP 1-4, TP2 x CP2) against HF transformers references."""

from __future__ import annotations

from functools import lru_cache

import pytest
import torch

from distributed import run_world
from hf_reference import (global_generate, load_hf, star_generate, star_kv, star_previous_generate,
                          star_previous_kv)
from workers import battery

N_NEW = 4
TOL = 1e-4  # fp32


def _contexts():
    g = torch.Generator().manual_seed(11)
    rand = lambda n: torch.randint(0, 101, (n,), generator=g).tolist()  # noqa: E731
    # uneven lengths; "L10" is shorter than one big block; "L3" leaves some ring chunks and star hosts empty
    return {"L37": (rand(37), rand(5)), "L64": (rand(64), rand(3)), "L10": (rand(10), rand(1)),
            "L3": (rand(3), rand(2))}


CONTEXTS = _contexts()
# name -> (mode, block, anchor, anchor_mode, partition, star_context); star variants default to the shared anchor
VARIANTS = {
    "ring": ("ring", 8, 8, "shared", "uniform", "anchor"),
    "star-1block": ("star", 128, 128, "shared", "uniform", "anchor"),
    "star-a0": ("star", 8, 0, "shared", "uniform", "anchor"),
    "star-a4": ("star", 8, 4, "shared", "uniform", "anchor"),
    "star-a8": ("star", 8, 8, "shared", "uniform", "anchor"),
    "star-a4-recompute": ("star", 8, 4, "recompute", "uniform", "anchor"),
    "star-a8-recompute": ("star", 8, 8, "recompute", "uniform", "anchor"),
    "star-a8-balanced": ("star", 8, 8, "shared", "balanced", "anchor"),
    "star-a4-balanced-recompute": ("star", 8, 4, "recompute", "balanced", "anchor"),
    # the remedies for small blocks (#23): an anchor of two and a half blocks, the previous block, landmarks
    "star-long-a20": ("star", 8, 20, "shared", "uniform", "long_anchor"),
    "star-long-a20-recompute": ("star", 8, 20, "recompute", "uniform", "long_anchor"),
    "star-prev-a4": ("star", 8, 4, "shared", "uniform", "anchor+previous"),
    "star-prev-a0": ("star", 8, 0, "shared", "uniform", "anchor+previous"),
    "star-prev-a8-balanced": ("star", 8, 8, "shared", "balanced", "anchor+previous"),
    "star-lm-a4": ("star", 8, 4, "shared", "uniform", "anchor+landmarks"),
    "star-lm-a4-recompute": ("star", 8, 4, "recompute", "uniform", "anchor+landmarks"),
}
LANDMARKS = (2, 2)  # anchor+landmarks: 2 chunks of 2 tokens
WORLDS = {"cp1": (1, 1), "cp2": (1, 2), "cp3": (1, 3), "cp4": (1, 4), "tp2cp2": (2, 2)}
# shared vs recompute phase 1: several blocks per host (L64 / block 4 = 16 blocks), anchor < and = block
KV_PAIRS = [{"name": f"b{b}-a{a}-{p}", "ctx": CONTEXTS["L64"][0], "block": b, "anchor": a, "partition": p}
            for b, a in ((4, 2), (4, 4), (8, 8)) for p in ("uniform", "balanced")] + [
    # an anchor over 5.5 blocks: on 4 hosts it comes in two pieces (host 0's 16 tokens, host 1's 6); landmarks
    {"name": "b4-a22-long_anchor", "ctx": CONTEXTS["L64"][0], "block": 4, "anchor": 22, "partition": "uniform",
     "star_context": "long_anchor"},
    {"name": "b4-a2-landmarks", "ctx": CONTEXTS["L64"][0], "block": 4, "anchor": 2, "partition": "uniform",
     "star_context": "anchor+landmarks"}]
# every star variant's phase 1 on L64 alone: its KV caches against the algorithm done by hand on HF's
KEPT = [dict(name=v, ctx=CONTEXTS["L64"][0], block=b, anchor=a, anchor_mode=am, partition=p, star_context=sc,
             landmarks=LANDMARKS) for v, (mode, b, a, am, p, sc) in VARIANTS.items() if mode == "star"]
PHASE2 = [{"name": f"a{a}", "ctx": CONTEXTS["L64"][0], "qry": CONTEXTS["L64"][1], "block": 8, "anchor": a}
          for a in (0, 4, 8)]


def _cases(world, ckpt):
    cases = []
    for lname, (ctx, qry) in CONTEXTS.items():
        for vname, (mode, block, anchor, anchor_mode, partition, star_context) in VARIANTS.items():
            cases.append(dict(name=f"{lname}/{vname}", mode=mode, block=block, anchor=anchor, ctx=ctx, qry=qry, n=N_NEW,
                              anchor_mode=anchor_mode, partition=partition, star_context=star_context,
                              landmarks=LANDMARKS))
        if world == "cp1":
            cases.append(dict(name=f"{lname}/none", mode="none", block=8, anchor=8, ctx=ctx, qry=qry, n=N_NEW))
    # EOS: the reference's second token is declared EOS, so generation must stop right after it.
    ctx, qry = CONTEXTS["L37"]
    eos = reference(ckpt, "L37", "none", 8, 8)[0][1]
    cases.append(dict(name="L37/ring-eos", mode="ring", block=8, anchor=8, ctx=ctx, qry=qry, n=N_NEW, eos=[eos]))
    return cases


_results = {}


def world_results(ckpt, world):
    """Every rank's battery for one world; run once per session."""
    if world not in _results:
        tp, cp = WORLDS[world]
        full = CONTEXTS["L37"][0] if world == "cp1" else None
        _results[world] = run_world(tp * cp, battery, ckpt, tp, cp, _cases(world, ckpt), PHASE2, full,
                                    "auto", "fp32", KV_PAIRS, "cpu", "local", KEPT)
    return _results[world]


def query_host_result(ckpt, world, name):
    """The case's result on the query host's TP rank 0 (the rank that has the logits)."""
    tp, cp = WORLDS[world]
    ranks = world_results(ckpt, world)
    r = ranks[(cp - 1) * tp]
    # every rank must agree on the generated tokens
    assert all(x["cases"][name]["tokens"] == r["cases"][name]["tokens"] for x in ranks)
    return r["cases"][name]


@lru_cache(maxsize=None)
def reference(ckpt, lname, mode, block, anchor, partition="uniform", star_context="anchor"):
    ctx, qry = CONTEXTS[lname]
    first = block + anchor if partition == "balanced" else None
    if star_context == "anchor+previous":
        return star_previous_generate(ckpt, ctx, qry, N_NEW, block, anchor, first)
    if mode == "star":
        return star_generate(ckpt, ctx, qry, N_NEW, block, anchor, first,
                             LANDMARKS if star_context == "anchor+landmarks" else None)
    return global_generate(ckpt, ctx, qry, N_NEW)


@pytest.mark.parametrize("world,variant", [(w, v) for w in WORLDS for v in VARIANTS] + [("cp1", "none")])
@pytest.mark.parametrize("lname", list(CONTEXTS))
def test_matches_reference(gqa_ckpt, world, lname, variant):
    """none, ring and star-with-one-block equal global attention (HF); star, with each ``star_context``, equals
    the algorithm done by hand on HF's KV cache."""
    mode, block, anchor, _, partition, star_context = VARIANTS.get(variant, ("none", 8, 8, "shared", "uniform",
                                                                             "anchor"))
    got = query_host_result(gqa_ckpt, world, f"{lname}/{variant}")
    tokens, logits = reference(gqa_ckpt, lname, mode, block, anchor, partition, star_context)
    assert torch.tensor(got["logits"]).sub(logits).abs().max().item() <= TOL
    assert got["tokens"] == tokens


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("lname", ["L37", "L64"])
def test_star_with_anchor_is_an_approximation(gqa_ckpt, world, lname):
    """With three or more blocks, star differs from global attention, and the anchor changes the result:
    proof that the anchor path really runs. (With two blocks and anchor = block, star is exact.)"""
    exact = torch.tensor(query_host_result(gqa_ckpt, world, f"{lname}/ring")["logits"])
    a0 = torch.tensor(query_host_result(gqa_ckpt, world, f"{lname}/star-a0")["logits"])
    for variant in ("star-a4", "star-a8"):
        star = torch.tensor(query_host_result(gqa_ckpt, world, f"{lname}/{variant}")["logits"])
        assert (star - exact).abs().max().item() > 1e-3
        assert (star - a0).abs().max().item() > 1e-3


@lru_cache(maxsize=None)
def reference_kv(ckpt, block, anchor, partition, star_context):
    ctx = CONTEXTS["L64"][0]
    first = block + anchor if partition == "balanced" else None
    if star_context == "anchor+previous":
        return star_previous_kv(ckpt, ctx, block, anchor, first)
    return star_kv(ckpt, ctx, block, anchor, first, LANDMARKS if star_context == "anchor+landmarks" else None)


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("variant", [c["name"] for c in KEPT])
def test_star_kv_cache_is_the_algorithm_by_hand(gqa_ckpt, world, variant):
    """Each host's KV cache after phase 1, hosts in order and TP ranks' heads side by side, equals star's phase
    1 done by hand on HF's KV cache, for every star_context (and the shared anchor and recompute)."""
    tp, cp = WORLDS[world]
    _, block, anchor, _, partition, star_context = VARIANTS[variant]
    ranks = world_results(gqa_ckpt, world)

    def held(rank, layer, i, d):  # [hk / tp, n, d], n possibly 0
        x = ranks[rank]["kept"][variant][layer][i]
        return torch.tensor(x).reshape(len(x), len(x[0]), d)

    for layer, (k_ref, v_ref) in enumerate(reference_kv(gqa_ckpt, block, anchor, partition, star_context)):
        for i, ref in enumerate((k_ref, v_ref)):
            d = ref.shape[-1]
            got = torch.cat([torch.cat([held(h * tp + t, layer, i, d) for t in range(tp)]) for h in range(cp)], dim=1)
            assert got.shape == ref[0].shape
            assert (got - ref[0]).abs().max().item() <= TOL


@pytest.mark.parametrize("world", list(WORLDS))
def test_each_star_context_changes_phase_1(gqa_ckpt, world):
    """With 8 blocks, the longer anchor, the previous block and the landmarks each change the result against
    plain star with the same anchor: proof that their paths really run."""
    plain = {a: torch.tensor(query_host_result(gqa_ckpt, world, f"L64/star-a{a}")["logits"]) for a in (0, 4, 8)}
    for variant, a in (("star-long-a20", 8), ("star-prev-a4", 4), ("star-prev-a0", 0), ("star-lm-a4", 4)):
        got = torch.tensor(query_host_result(gqa_ckpt, world, f"L64/{variant}")["logits"])
        assert (got - plain[a]).abs().max().item() > 1e-3, variant


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("case", [c["name"] for c in PHASE2])
def test_star_phase2_is_exact_global_attention(gqa_ckpt, world, case):
    """Phase 2's merged output equals one softmax over every host's KV (no causal mask against the context)."""
    for rank_result in world_results(gqa_ckpt, world):
        assert rank_result["phase2"][case] <= 1e-5


def test_full_forward_matches_hf(gqa_ckpt):
    ids = CONTEXTS["L37"][0]
    ours = torch.tensor(world_results(gqa_ckpt, "cp1")[0]["full_logits"])
    with torch.no_grad():
        ref = load_hf(gqa_ckpt)(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() <= TOL


def test_tied_embeddings_mha_matches_hf(mha_tied_ckpt):
    """Tied input/output embeddings: one tensor in memory (the output layer has no weight of its own, and the
    model holds exactly the checkpoint's bytes, as the planner counts), and the logits of HF."""
    from safetensors import safe_open

    from star_mcore.inference.planner import weight_bytes
    from star_mcore.model.arch import LlamaArch

    ctx, qry = CONTEXTS["L37"][0], CONTEXTS["L37"][1]
    ctx = [t % 64 for t in ctx]
    qry = [t % 64 for t in qry]
    cases = [dict(name="ring", mode="ring", block=8, anchor=8, ctx=ctx, qry=qry, n=N_NEW),
             dict(name="star", mode="star", block=8, anchor=8, ctx=ctx, qry=qry, n=N_NEW)]
    ranks = run_world(2, battery, mha_tied_ckpt, 1, 2, cases)
    with safe_open(f"{mha_tied_ckpt}/model.safetensors", framework="pt") as f:
        checkpoint_bytes = sum(f.get_tensor(k).numel() * 4 for k in f.keys())
    for r in ranks:
        assert not r["output_layer_weight"]
        assert r["param_bytes"] == checkpoint_bytes == weight_bytes(LlamaArch.from_hf_dir(mha_tied_ckpt), 1, "fp32")
    got = ranks[1]["cases"]
    tokens, logits = global_generate(mha_tied_ckpt, ctx, qry, N_NEW)
    assert (torch.tensor(got["ring"]["logits"]) - logits).abs().max().item() <= TOL
    assert got["ring"]["tokens"] == tokens
    tokens, logits = star_generate(mha_tied_ckpt, ctx, qry, N_NEW, 8, 8)
    assert (torch.tensor(got["star"]["logits"]) - logits).abs().max().item() <= TOL
    assert got["star"]["tokens"] == tokens


@pytest.mark.parametrize("world", list(WORLDS))
def test_generation_stops_at_eos(gqa_ckpt, world):
    tokens, _ = reference(gqa_ckpt, "L37", "none", 8, 8)
    got = query_host_result(gqa_ckpt, world, "L37/ring-eos")["tokens"]
    assert got == tokens[:2] and len(tokens) == N_NEW


def test_bf16_ring_and_star_track_fp32_global_attention(gqa_ckpt):
    """bf16 end to end on CP=2: the exact modes stay within bf16 rounding of the fp32 reference."""
    ctx, qry = CONTEXTS["L64"]
    cases = [dict(name=v, mode=VARIANTS[v][0], block=VARIANTS[v][1], anchor=VARIANTS[v][2], ctx=ctx, qry=qry, n=N_NEW)
             for v in ("ring", "star-1block")]
    ranks = run_world(2, battery, gqa_ckpt, 1, 2, cases, (), None, "auto", "bf16")
    _, logits = reference(gqa_ckpt, "L64", "none", 8, 8)
    assert ranks[0]["param_dtypes"] == ["torch.bfloat16"]  # norms too: nothing is kept in fp32
    for v in ("ring", "star-1block"):
        got = torch.tensor(ranks[1]["cases"][v]["logits"])
        assert (got - logits).abs().max().item() < 0.15
        assert ranks[0]["cases"][v]["tokens"] == ranks[1]["cases"][v]["tokens"]


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("case", [c["name"] for c in KV_PAIRS])
def test_shared_anchor_gives_the_same_kv_as_recompute(gqa_ckpt, world, case):
    """Sending the anchor KV (block 0's, or a long anchor's pieces from their hosts) instead of re-encoding the
    anchor changes no number (fp32 rounding)."""
    held = 0
    for rank_result in world_results(gqa_ckpt, world):
        r = rank_result["kv_pairs"][case]
        assert r["max_diff"] <= 1e-5
        held += r["held"]
    tp, _ = WORLDS[world]
    assert held == tp * len(CONTEXTS["L64"][0])  # every context token is held by exactly one host


@pytest.mark.parametrize("world", list(WORLDS))
@pytest.mark.parametrize("lname", list(CONTEXTS))
@pytest.mark.parametrize("anchor", [4, 8])
def test_shared_and_recompute_give_the_same_logits(gqa_ckpt, world, lname, anchor):
    shared = query_host_result(gqa_ckpt, world, f"{lname}/star-a{anchor}")
    recompute = query_host_result(gqa_ckpt, world, f"{lname}/star-a{anchor}-recompute")
    assert (torch.tensor(shared["logits"]) - torch.tensor(recompute["logits"])).abs().max().item() <= 1e-5
    assert shared["tokens"] == recompute["tokens"]
