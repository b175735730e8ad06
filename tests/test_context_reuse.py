"""Phase 1 once, many queries: requests in a row over the same context reuse the hosts' phase-1 caches and get
exactly the tokens and logits they get alone, for none, ring and star (gloo worlds CP 1-4, TP2 x CP2), with
either decode loop; through the CLI, each result says whether its context was reused."""

from __future__ import annotations

import json

import pytest
import torch

from distributed import run_world
from workers import reuse_vs_alone


def _ids(n, seed):
    return torch.randint(0, 101, (n,), generator=torch.Generator().manual_seed(seed)).tolist()


A, B = _ids(41, 1), _ids(29, 2)
# A three times (the second query longer than the first: the query host's cache must grow), B, then A again
REQUESTS = [[A, _ids(2, 3)], [A, _ids(9, 4)], [A, _ids(3, 5)], [B, _ids(4, 6)], [A, _ids(2, 7)]]
REUSED = [False, True, True, False, False]
WORLDS = {"cp1": (1, 1), "cp2": (1, 2), "cp4": (1, 4), "tp2cp2": (2, 2)}


def _variants(world):
    out = [dict(name=f"{m}-{d}", mode=m, block=8, anchor=4, decode=d)
           for m in ("ring", "star") for d in ("graph", "eager")]
    if world == "cp1":
        out.append(dict(name="none-graph", mode="none", block=8, anchor=4, decode="graph"))
    return out


@pytest.mark.parametrize("world", list(WORLDS))
def test_reused_context_gives_what_each_request_gets_alone(gqa_ckpt, world):
    tp, cp = WORLDS[world]
    ranks = run_world(tp * cp, reuse_vs_alone, gqa_ckpt, tp, cp, _variants(world), REQUESTS)
    query_host = ranks[(cp - 1) * tp]
    for v in _variants(world):
        reuse, alone = query_host[f"{v['name']}/reuse"], query_host[f"{v['name']}/alone"]
        assert [r["reused"] for r in reuse] == REUSED
        assert [r["reused"] for r in alone] == [False] * len(REQUESTS)
        assert all(r["phase1_s"] == 0.0 for r in reuse if r["reused"])
        for i, (a, b) in enumerate(zip(reuse, alone)):
            assert a["tokens"] == b["tokens"], (v["name"], i)
            assert len(a["tokens"]) == 5
            assert (torch.tensor(a["logits"]) - torch.tensor(b["logits"])).abs().max().item() <= 1e-6, (v["name"], i)
        for r in ranks:  # every rank generated the same tokens
            assert [x["tokens"] for x in r[f"{v['name']}/reuse"]] == [x["tokens"] for x in reuse]


def test_generate_marks_reused_contexts(gqa_ckpt, tmp_path):
    from test_cli import torchrun

    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    req.write_text("".join(json.dumps({"id": f"r{i}", "context_ids": c, "query_ids": q}) + "\n"
                           for i, (c, q) in enumerate(REQUESTS)))
    res = torchrun(2, [f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={req}", f"inference.output_path={out}",
                       "model.context_parallel_size=2", "inference.block_size=8", "inference.anchor_size=4",
                       "inference.tokens_to_generate=5"])
    assert res.returncode == 0, res.stderr[-3000:]
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in recs] == [f"r{i}" for i in range(len(REQUESTS))]
    assert [r["context_reused"] for r in recs] == REUSED
    assert all(r["phase1_s"] == 0.0 for r in recs if r["context_reused"])
    assert all(len(r["generated_ids"]) == 5 for r in recs)
