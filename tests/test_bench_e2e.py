"""scripts/bench_e2e.py (the multi-GPU end-to-end benchmark) on CPU: its --smoke through torchrun on 4 gloo
ranks, fp32, and the numbers it must get right: ring's first-step logits and tokens against none's, star's
phase 2 against one softmax over every host's KV, a row per setting."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from distributed import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = str(ROOT / "scripts" / "bench_e2e.py")
FP32 = 1e-4  # fp32 rounding through 2 tiny layers (measured ~2e-6 for logits, ~3e-7 for attention outputs)


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def bench(nproc, args, timeout=300):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", SCRIPT, "--device", "cpu", "--smoke", "--precision", "fp32", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


@pytest.mark.parametrize("tp,cp,lengths", [(2, 2, "64,128"), (1, 4, "128")])
def test_smoke_agrees_with_none(tmp_path, tp, cp, lengths):
    out = tmp_path / "e2e.json"
    res = bench(4, ["--tp", str(tp), "--cp", str(cp), "--lengths", lengths, "--out", str(out)])
    assert res.returncode == 0, res.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and (data["world"], data["tp"], data["cp"], data["layers"]) == (4, tp, cp, 2)
    assert data["precision"] == "fp32" and data["nccl_nvls_enable"] == "0"
    rows = data["rows"]
    keys = [(r["context"], r["mode"], r["anchor_fraction"], r["partition"]) for r in rows]
    expect = [(int(n), m, f, p) for n in lengths.split(",") for m, f, p in
              [("none", None, None), ("ring", None, None)]
              + [("star", f, p) for p in ("uniform", "balanced") for f in (1, 4)]]
    assert keys == expect
    printed = [line for line in res.stdout.splitlines() if line.startswith("n=")]
    assert len(printed) == len(rows)
    for r in rows:
        n = r["context"]
        assert r["phase1_s"] > 0 and r["first_token_s"] > 0 and r["decode_ms_per_token"] > 0
        assert len(r["tokens"]) == 3 and len(r["samples"]) == 1
        if r["mode"] == "none":
            assert r["block"] == n and "max_dlogit_vs_none" not in r
            continue
        assert r["block"] == n // cp
        assert 0 <= r["max_dlogit_vs_none"] < 1e3
        if r["mode"] == "ring":
            assert r["max_dlogit_vs_none"] < FP32, r
            assert r["tokens_equal_none"], r
            assert "phase2_exact_err" not in r
        else:
            assert r["anchor"] == r["block"] // r["anchor_fraction"]
            assert 0 <= r["phase2_exact_err"] < FP32, r
    # Star with a small anchor approximates (the check above is not vacuous: it differs from none).
    assert max(r["max_dlogit_vs_none"] for r in rows if r["mode"] == "star") > 1e-2


def test_bad_grid_is_one_line(tmp_path):
    res = subprocess.run([sys.executable, SCRIPT, "--device", "cpu", "--smoke", "--tp", "2", "--cp", "3",
                          "--out", str(tmp_path / "x.json")], capture_output=True, text=True, timeout=300,
                         env=dict(_env(), MASTER_PORT=str(free_port())), cwd=ROOT)
    assert res.returncode == 1
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("bench_e2e: rank 0: ValueError: --tp 2 x --cp 3 must equal the world size 1"), res.stderr
    assert not (tmp_path / "x.json").exists()
