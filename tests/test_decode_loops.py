"""Phase 2's decode loops on real gloo worlds: the static step (fixed KV buffers, device-side lengths, the
masked tail, on-device argmax and EOS) and the graph loop (on CPU: the same static step, without a graph)
give the eager step's tokens and every step's logits to fp32 tolerance, for none, ring and star, CP 1-4 and
TP2 x CP2, including hosts that hold no context at all."""

from __future__ import annotations

import pytest
import torch

from distributed import run_world
from workers import decode_loops

TOL = 1e-5  # fp32: the loops differ only in kernel and summation order


def _ids(n, seed):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


CTX, QRY = _ids(45, 1), _ids(3, 2)
SHORT = _ids(2, 3)  # shorter than the CP group: some hosts hold nothing
VARIANTS = {
    "ring": dict(mode="ring", block=8, anchor=8),
    "star": dict(mode="star", block=8, anchor=4),
}
WORLDS = {"cp1": (1, 1), "cp2": (1, 2), "cp4": (1, 4), "tp2cp2": (2, 2)}
_results = {}


def _cases(world):
    cases = [dict(name=f"{v}", ctx=CTX, qry=QRY, n=6, **kw) for v, kw in VARIANTS.items()]
    cases.append(dict(name="star-short", ctx=SHORT, qry=QRY, n=4, mode="star", block=1, anchor=1))
    if world == "cp1":
        cases.append(dict(name="none", ctx=CTX, qry=QRY, n=6, mode="none", block=8, anchor=8))
    return cases


def results(ckpt, world):
    if world not in _results:
        tp, cp = WORLDS[world]
        _results[world] = run_world(tp * cp, decode_loops, ckpt, tp, cp, _cases(world))
    return _results[world]


@pytest.mark.parametrize("world", list(WORLDS))
def test_static_and_graph_loops_give_the_eager_tokens_and_logits(gqa_ckpt, world):
    tp, cp = WORLDS[world]
    ranks = results(gqa_ckpt, world)
    query_host = ranks[(cp - 1) * tp]
    for case in _cases(world):
        eager = query_host[f"{case['name']}/eager"]
        assert len(eager["tokens"]) == case["n"]  # no EOS: the whole budget
        assert len(eager["logits"]) == case["n"]  # the query pass + every decode step
        for loop in ("static", "graph"):
            got = query_host[f"{case['name']}/{loop}"]
            assert all(r[f"{case['name']}/{loop}"]["tokens"] == eager["tokens"] for r in ranks), (case, loop)
            assert len(got["logits"]) == len(eager["logits"])
            worst = (torch.tensor(got["logits"]) - torch.tensor(eager["logits"])).abs().max().item()
            assert worst <= TOL, (case["name"], loop, worst)


def test_loops_stop_at_the_same_eos(gqa_ckpt):
    """The third generated token declared EOS: every loop stops right after it, on every rank."""
    tp, cp = 1, 2
    base = dict(name="ring", ctx=CTX, qry=QRY, n=6, mode="ring", block=8, anchor=8)
    eager = results(gqa_ckpt, "cp2")[cp - 1]["ring/eager"]["tokens"]
    eos = [eager[2]]
    assert eager.index(eos[0]) == 2  # the stop must come from the third token
    ranks = run_world(tp * cp, decode_loops, gqa_ckpt, tp, cp, [dict(base, eos=eos)])
    for r in ranks:
        for loop in ("eager", "static", "graph"):
            assert r[f"ring/{loop}"]["tokens"] == eager[:3]


def test_a_non_finite_decode_step_is_reported_the_same_by_every_loop(gqa_ckpt):
    from workers import decode_step_errors

    errors = run_world(1, decode_step_errors, gqa_ckpt)[0]
    expected = "non-finite values (NaN/Inf) in the attention output of layer 0 during phase 2 (step 1)"
    assert errors == {"eager": expected, "static": expected, "graph": expected}
