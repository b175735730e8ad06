"""Continuous batching on real gloo worlds (CP 1, 2, 4 and TP2 x CP2; none, ring, star; the static decode loop, and the
eager one beside it at CP 1 and 2): every request of a batch gets exactly what it gets alone — tokens, finish
reason, first-step logits, log-probs — with mixed context lengths, several requests over one context (one phase 1,
one copy of its KV), more requests than slots (refills), an EOS in the middle of the batch, seeded sampling, and a
NaN in one request's decode step (that request fails, the others go on)."""

from __future__ import annotations

import pytest
import torch

from distributed import run_world
from hf_reference import global_generate
from workers import batch_vs_alone

TOL = 1e-5


def _ids(n, seed):
    return torch.randint(0, 100, (n,), generator=torch.Generator().manual_seed(seed)).tolist()  # never token 100


A, B, C, D = _ids(45, 1), _ids(29, 2), _ids(12, 3), _ids(3, 4)
JOBS = [
    dict(tag="j0", ctx=A, qry=_ids(3, 10), n=5),
    dict(tag="j1", ctx=B, qry=_ids(9, 11), n=7),
    dict(tag="j2", ctx=A, qry=_ids(2, 12), n=4),  # A again while j0 runs: shared
    dict(tag="j3", ctx=C, qry=_ids(4, 13), n=6, temperature=0.9, top_p=0.9, seed=11),
    dict(tag="j4", ctx=A, qry=_ids(5, 14), n=3, temperature=1.2, top_k=5, seed=5, logprobs=3),
    dict(tag="j5", ctx=D, qry=_ids(2, 15), n=5),  # shorter than some CP groups: hosts with nothing
    dict(tag="j6", ctx=B, qry=_ids(1, 16), n=2),
]
RING, STAR = dict(mode="ring", block=8, anchor=8), dict(mode="star", block=8, anchor=4)
WORLDS = {"cp1": (1, 1), "cp2": (1, 2), "cp4": (1, 4), "tp2cp2": (2, 2)}
# the eager loop (the reference) where it matters most; the larger worlds check batched == alone on the static one
LOOPS = {"cp1": ("eager", "static"), "cp2": ("eager", "static"), "cp4": ("static",), "tp2cp2": ("static",)}
_results = {}


def _variants(world, ckpt):
    out = [dict(name="ring", **RING), dict(name="star", **STAR)]
    if world == "cp1":
        out.append(dict(name="none", mode="none", block=8, anchor=8))
    if world == "cp2":  # j1's third greedy token (global attention: HF's) declared EOS for every request
        out.append(dict(name="ring-eos", eos=[global_generate(ckpt, B, JOBS[1]["qry"], 7)[0][2]], **RING))
    return out


def results(ckpt, world):
    if world not in _results:
        tp, cp = WORLDS[world]
        _results[world] = run_world(tp * cp, batch_vs_alone, ckpt, tp, cp, _variants(world, ckpt), JOBS,
                                    LOOPS[world], 3, 4, "j1" if world == "cp2" else None)
    return _results[world]


def _close(a, b):
    return (torch.tensor(a) - torch.tensor(b)).abs().max().item() <= TOL


@pytest.mark.parametrize("world", list(WORLDS))
def test_every_request_of_a_batch_gets_what_it_gets_alone(gqa_ckpt, world):
    tp, cp = WORLDS[world]
    ranks = results(gqa_ckpt, world)
    query_host = ranks[(cp - 1) * tp]
    for v in _variants(world, gqa_ckpt):
        eager = query_host[f"{v['name']}/{LOOPS[world][0]}"]
        for loop in LOOPS[world]:
            got = query_host[f"{v['name']}/{loop}"]
            assert got["free"], "every page went back to the pool"
            for j in JOBS:
                b, a, e = got["batch"][j["tag"]], got["alone"][j["tag"]], eager["alone"][j["tag"]]
                assert b["tokens"] == a["tokens"] == e["tokens"], (v["name"], loop, j["tag"])
                assert b["finish"] == a["finish"]
                assert _close(b["logits"], a["logits"]) and _close(b["logits"], e["logits"])
                if j.get("logprobs"):
                    assert len(b["logprobs"]) == len(b["tokens"])
                    for x, y in zip(b["logprobs"], e["logprobs"]):
                        assert x["id"] == y["id"] and abs(x["logprob"] - y["logprob"]) <= TOL
                        assert [i for i, _ in x["top"]] == [i for i, _ in y["top"]] and len(x["top"]) == 3
            for r in ranks:  # every rank has the same tokens
                assert {t: o["tokens"] for t, o in r[f"{v['name']}/{loop}"]["batch"].items()} == \
                    {t: o["tokens"] for t, o in got["batch"].items()}


def test_a_sampled_request_draws_its_first_token_from_its_logits_with_the_sampler(gqa_ckpt):
    """The engine's sampled token is the sampler's (ops.sampling, tested for its distribution) on the request's
    own first-step logits, with its seed and token index 0."""
    from star_mcore.ops.sampling import SamplingParams, sample

    got = results(gqa_ckpt, "cp2")[1]["star/static"]["batch"]
    for j in (JOBS[3], JOBS[4]):
        p = SamplingParams(torch.tensor([j["temperature"]]), torch.tensor([j.get("top_k", 0)]),
                           torch.tensor([j.get("top_p", 1.0)]), torch.tensor([j["seed"]]), torch.tensor([0]))
        token, *_ = sample(torch.tensor([got[j["tag"]]["logits"]]), p)
        assert token.item() == got[j["tag"]]["tokens"][0], j["tag"]


def test_requests_over_one_context_share_its_phase_1(gqa_ckpt):
    got = results(gqa_ckpt, "cp2")[1]["star/static"]["batch"]
    # j0 encodes A, j2 and j4 reuse it (running beside j0, or resident after it); j6 reuses B
    assert [got[t]["reused"] for t in ("j0", "j1", "j2", "j3", "j4", "j5", "j6")] == \
        [False, False, True, False, True, False, True]


def test_greedy_batches_give_global_attention_and_budgets_end_with_length(gqa_ckpt):
    got = results(gqa_ckpt, "cp2")[1]["ring/static"]["batch"]
    for j in JOBS:
        if not j.get("temperature"):
            assert got[j["tag"]]["tokens"] == global_generate(gqa_ckpt, j["ctx"], j["qry"], j["n"])[0]
            assert got[j["tag"]]["finish"] == "length" and len(got[j["tag"]]["tokens"]) == j["n"]


def test_eos_in_the_middle_of_a_batch(gqa_ckpt):
    eos_run = results(gqa_ckpt, "cp2")[1]["ring-eos/static"]["batch"]
    plain = results(gqa_ckpt, "cp2")[1]["ring/static"]["batch"]
    eos = plain["j1"]["tokens"][2]
    assert eos_run["j1"]["tokens"] == plain["j1"]["tokens"][:3] and eos_run["j1"]["finish"] == "eos"
    for tag, o in eos_run.items():  # every other request: cut at its own first EOS, if any, else unchanged
        full = plain[tag]["tokens"]
        cut = full[: full.index(eos) + 1] if eos in full else full
        assert o["tokens"] == cut, tag


def test_a_nan_in_one_requests_step_fails_that_request_alone(gqa_ckpt):
    ranks = results(gqa_ckpt, "cp2")
    plain = ranks[1]["ring/eager"]["batch"]  # the poisoned runs are of the first variant
    for loop in ("eager", "static"):
        poisoned = ranks[1][f"poisoned/{loop}"]
        tok = poisoned["token"]
        assert poisoned["batch"]["j1"] == {
            "error": "non-finite values (NaN/Inf) in the attention output of layer 0 during phase 2 (step 1)"}
        for j in JOBS:
            if j["tag"] == "j1" or tok in j["ctx"] + j["qry"] or tok in plain[j["tag"]]["tokens"][:-1]:
                continue  # the poisoned job, and any other that reads or feeds the poisoned token
            assert poisoned["batch"][j["tag"]]["tokens"] == plain[j["tag"]]["tokens"], (loop, j["tag"])
