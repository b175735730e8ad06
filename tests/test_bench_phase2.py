"""The phase-2 benchmarks' --smoke runs on CPU (tiny shape): the scripts run end to end and their JSON holds
what the docs read from it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _smoke(script, out):
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / script), "--smoke", "--device", "cpu",
                          "--out", str(out)],
                         capture_output=True, text=True, timeout=600, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)))
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(out.read_text())


def test_decode_floor_smoke(tmp_path):
    data = _smoke("bench_decode_floor.py", tmp_path / "floor.json")
    assert [(r["context"], r["kv_share"]) for r in data["rows"]] == [(256, 256), (256, 32), (512, 512), (512, 64)]
    for r in data["rows"]:
        assert set(r["loops"]) == {"graph", "eager"}
        assert r["loops"]["graph"]["graph_used"] is False  # CPU: the static step without a graph
        assert r["decode_ms_per_token"] == round(r["loops"]["graph"]["ms_per_token"], 4)
        assert r["step_bytes"] > 0 and r["first_token_s"] > 0 and r["transformer_impl"] == "local"


def test_context_reuse_smoke(tmp_path):
    data = _smoke("bench_context_reuse.py", tmp_path / "reuse.json")
    assert [(r["context"], r["mode"]) for r in data["rows"]] == [(256, "none"), (256, "star")]
    for r in data["rows"]:
        assert r["same_tokens"] and r["reused"] == [False, True, True]
        assert r["reuse"]["phase1_s"][1:] == [0.0, 0.0] and all(t > 0 for t in r["alone"]["phase1_s"])


def test_batch_smoke(tmp_path):
    data = _smoke("bench_batch.py", tmp_path / "batch.json")
    assert [(r["batch"], r["kv_share"], r["shared_context"]) for r in data["rows"]] == \
        [(1, 64, False), (3, 64, False), (1, 96, True), (3, 96, True)]
    for r in data["rows"]:
        assert set(r) >= {"batch", "kv_share", "shared_context", "ms_per_step", "tokens_per_s", "floor_ms_per_step"}
    assert [(w["max_batch_size"], w["requests"]) for w in data["workload"]] == [(1, 5), (3, 5)]
    assert all(0 < w["phase1_s"] and 0 < w["phase1_share"] < 1 for w in data["workload"])


def test_paged_kernel_smoke(tmp_path):
    """Triton's interpreter runs the kernel on CPU: the layouts the static step builds, one row per tile."""
    data = _smoke("bench_paged_kernel.py", tmp_path / "paged.json")
    assert [(r["context"], r["batch"], r["shared_context"], r["rows_per_program"]) for r in data["rows"]] == \
        [(40, 3, True, 16), (20, 2, False, 16)]
    assert all(r["us_per_call"] > 0 and r["splits"] >= 1 for r in data["rows"])
