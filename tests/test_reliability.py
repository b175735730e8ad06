"""Never hang, lose nothing, refuse bad numbers: on real multi-process CPU jobs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import free_port, wait_all
from hf_reference import global_generate
from test_cli import CONFIG, ROOT, star_mcore, torchrun

WORKER = str(Path(__file__).parent / "fault_worker.py")


def _requests(path: Path, n: int, ctx_len: int, seed: int = 9, vocab: int = 101):
    g = torch.Generator().manual_seed(seed)
    reqs = [{"id": f"r{i}", "context_ids": torch.randint(0, vocab, (ctx_len,), generator=g).tolist(),
             "query_ids": torch.randint(0, vocab, (3,), generator=g).tolist()} for i in range(n)]
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return reqs


def _launch_ranks(world: int, args, tmp: Path, env_extra=None):
    """Start ``world`` ranks directly (no torchrun): each gets RANK/WORLD_SIZE/MASTER_* like srun would give."""
    port = free_port()
    procs = []
    for r in range(world):
        env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port), OMP_NUM_THREADS="1", PYTHONPATH=f"{ROOT}:{ROOT / 'tests'}",
                   **(env_extra or {}))
        err = open(tmp / f"rank{r}.err", "w")
        procs.append((subprocess.Popen([sys.executable, WORKER, *args], env=env, stderr=err, stdout=subprocess.DEVNULL,
                                       cwd=ROOT), err))
    return procs


def _args(ckpt, req, out, extra=()):
    return ["generate", "--config", CONFIG, f"checkpoint.hf_path={ckpt}", f"inference.input_path={req}",
            f"inference.output_path={out}", "inference.block_size=32", "inference.anchor_size=32",
            "inference.tokens_to_generate=4", "distributed.heartbeat_timeout_s=10", "distributed.timeout_s=300", *extra]


def test_killed_rank_makes_every_other_rank_exit_naming_it(gqa_ckpt, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    _requests(req, 40, 400)
    procs = _launch_ranks(4, _args(gqa_ckpt, req, out, ["model.context_parallel_size=4"]), tmp_path)
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 1):
        time.sleep(0.2)
    assert out.exists(), "the job never answered a request"
    procs[1][0].send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    codes = wait_all([procs[r] for r in (0, 2, 3)], timeout=60)
    assert time.monotonic() - killed_at < 60
    for r, code in zip((0, 2, 3), codes):
        assert code not in (0, None), f"rank {r} exit code {code}"
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "rank 1" in err and "star-mcore: error:" in err, err[-2000:]
        assert "Traceback" not in err
    assert out.read_text().count("\n") < 40  # it really was mid-run


def test_raising_rank_makes_every_other_rank_exit_naming_it(gqa_ckpt, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    _requests(req, 6, 120)
    # one request at a time, so that r0 is finished when r1's query pass fails
    procs = _launch_ranks(4, _args(gqa_ckpt, req, out, ["model.context_parallel_size=4", "inference.max_batch_size=1"]),
                          tmp_path, {"FAULT_RANK": "2", "FAULT_AT": "2"})
    codes = wait_all(procs, timeout=120)
    assert all(c not in (0, None) for c in codes), codes
    assert "rank 2: RuntimeError: injected fault" in (tmp_path / "rank2.err").read_text()
    for r in (0, 1, 3):
        err = (tmp_path / f"rank{r}.err").read_text()
        assert "because rank 2 failed: RuntimeError: injected fault" in err, err[-2000:]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == ["r0"]  # the finished one is kept


def test_interrupted_run_resumes_without_duplicates_or_losses(gqa_ckpt, tmp_path):
    """Killed mid-run (3 requests decoding together, lines written as they end), then rerun: every line written
    before the kill is kept as it was, no request is answered twice, and the finished file is in input order."""
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    reqs = _requests(req, 12, 300)
    args = _args(gqa_ckpt, req, out, ["inference.context_parallel_mode=none", "model.context_parallel_size=1",
                                      "inference.max_batch_size=3"])
    first = subprocess.Popen([sys.executable, "-m", "star_mcore", *args], cwd=ROOT, stderr=subprocess.DEVNULL,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
        time.sleep(0.05)
    first.kill()
    first.wait()
    with open(out, "a") as f:
        f.write('{"id": "r7", "generated_i')  # a line torn by the crash
    kept = out.read_text().splitlines()[:-1]
    assert 2 <= len(kept) < 12
    res = star_mcore(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert f"resuming: {len(kept)} request(s) already in" in res.stderr
    lines = out.read_text().splitlines()
    assert set(kept) <= set(lines)  # nothing computed is lost or rewritten
    recs = [json.loads(x) for x in lines]
    assert [r["id"] for r in recs] == [r["id"] for r in reqs]  # each once, in input order
    for r, q in zip(recs, reqs):
        assert r["generated_ids"] == global_generate(gqa_ckpt, q["context_ids"], q["query_ids"], 4)[0]


def test_sigterm_finishes_the_running_requests_and_a_rerun_the_rest(gqa_ckpt, tmp_path):
    """A scheduler's SIGTERM mid-run (sent, for a known point, during the third request's query pass with two
    slots): nothing new is admitted, the two running requests finish and are written after the first, the run
    says so in one line and exits 143; the rerun answers the rest, each request once, in input order."""
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    reqs = _requests(req, 16, 200)
    args = _args(gqa_ckpt, req, out, ["inference.context_parallel_mode=none", "model.context_parallel_size=1",
                                      "inference.max_batch_size=2", "inference.tokens_to_generate=12"])
    (proc, err_file), = _launch_ranks(1, args, tmp_path, {"FAULT_RANK": "0", "FAULT_AT": "3", "FAULT_SIGTERM": "1"})
    assert wait_all([(proc, err_file)], timeout=240) == [143]
    err = (tmp_path / "rank0.err").read_text()
    assert err.strip().splitlines()[-1] == (
        "star-mcore: stopped by SIGTERM: the running requests were finished and written; rerun with the same "
        f"inference.output_path={out} to answer the rest")
    assert "Traceback" not in err
    first = [json.loads(x) for x in out.read_text().splitlines()]  # every line whole
    assert [r["id"] for r in first] == ["r0", "r1", "r2"] and all(len(r["generated_ids"]) == 12 for r in first)
    res = star_mcore(*args)
    assert res.returncode == 0, res.stderr[-2000:]
    assert [json.loads(x)["id"] for x in out.read_text().splitlines()] == [r["id"] for r in reqs]


@pytest.fixture(scope="module")
def poisoned_ckpts(gqa_ckpt, tmp_path_factory):
    """Copies of the tiny model: token 100's embedding is inf; or layer 1's q_proj holds a NaN."""
    src = Path(gqa_ckpt)
    out = {}
    for name in ("embedding", "layer1"):
        dst = tmp_path_factory.mktemp(name)
        for f in ("config.json", "generation_config.json"):
            (dst / f).write_text((src / f).read_text())
        w = load_file(str(src / "model.safetensors"))
        if name == "embedding":
            w["model.embed_tokens.weight"][100] = float("inf")
        else:
            w["model.layers.1.self_attn.q_proj.weight"][0, 0] = float("nan")
        save_file(w, str(dst / "model.safetensors"))
        out[name] = str(dst)
    return out


def test_non_finite_values_are_reported_per_request_naming_the_layer(poisoned_ckpts, tmp_path):
    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    req.write_text("\n".join(json.dumps(r) for r in [
        {"id": "clean", "context_ids": list(range(40)), "query_ids": [1, 2]},
        {"id": "bad-context", "context_ids": list(range(40)) + [100], "query_ids": [1, 2]},
        {"id": "bad-query", "context_ids": list(range(40)), "query_ids": [1, 100]},
    ]) + "\n")
    res = torchrun(2, [f"checkpoint.hf_path={poisoned_ckpts['embedding']}", f"inference.input_path={req}",
                       f"inference.output_path={out}", "model.context_parallel_size=2", "inference.block_size=16",
                       "inference.anchor_size=16", "inference.tokens_to_generate=3"])
    assert res.returncode == 0, res.stderr[-2000:]
    recs = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    assert len(recs["clean"]["generated_ids"]) == 3
    assert recs["bad-context"]["error"] == ("non-finite values (NaN/Inf) in the attention output of layer 0 "
                                            "during phase 1 (context encoding)")
    assert recs["bad-query"]["error"] == ("non-finite values (NaN/Inf) in the attention output of layer 0 "
                                          "during phase 2 (step 0)")

    out2 = tmp_path / "out2.jsonl"
    res = star_mcore("generate", "--config", CONFIG, f"checkpoint.hf_path={poisoned_ckpts['layer1']}",
                     f"inference.input_path={req}", f"inference.output_path={out2}", "model.context_parallel_size=1",
                     "inference.context_parallel_mode=none", "inference.tokens_to_generate=3")
    assert res.returncode == 0, res.stderr[-2000:]
    for r in map(json.loads, out2.read_text().splitlines()):
        assert "attention output of layer 1 during phase 1" in r["error"]


def test_output_path_that_is_a_directory_is_refused(gqa_ckpt, tmp_path):
    req = tmp_path / "req.jsonl"
    _requests(req, 1, 10)
    res = star_mcore("generate", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={req}",
                     f"inference.output_path={tmp_path}", "model.context_parallel_size=1")
    assert res.returncode == 2
    assert res.stderr.strip() == f"star-mcore: error: inference.output_path={tmp_path}: is a directory, not a file"
