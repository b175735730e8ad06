"""The README's main job: one CPU run each of none, ring and star on the same requests, launched with
torchrun like a user would, then their agreement and timings side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import torch

from ..errors import RunError
from ..model.tiny import make_tiny_llama

CONFIG = Path(__file__).resolve().parents[2] / "configs" / "demo_cpu.yaml"


def _requests(path: Path, context_len: int, vocab: int, n: int = 2) -> None:
    g = torch.Generator().manual_seed(1234)
    with open(path, "w") as f:
        for i in range(n):
            ctx = torch.randint(0, vocab, (context_len - 97 * i,), generator=g).tolist()
            qry = torch.randint(0, vocab, (12,), generator=g).tolist()
            f.write(json.dumps({"id": f"req-{i}", "context_ids": ctx, "query_ids": qry}) + "\n")


def _launch(nproc: int, overrides: List[str]) -> None:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "star_mcore", "generate", "--config", str(CONFIG), *overrides]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    print("$ " + " ".join(["torchrun"] + cmd[3:]), flush=True)
    rc = subprocess.run(cmd, env=env).returncode
    if rc != 0:
        raise RunError(f"the demo's run ({' '.join(overrides[-2:])}) failed with exit code {rc}")


def _read(path: Path) -> Dict[str, dict]:
    return {r["id"]: r for r in map(json.loads, path.read_text().splitlines())}


def run_demo(workdir: str, nproc: int = 4, context_len: int = 4096) -> int:
    work = Path(workdir)
    model = work / "model"
    if not (model / "config.json").exists():
        make_tiny_llama(model, vocab_size=512, hidden_size=256, intermediate_size=512, num_layers=4,
                        num_heads=8, num_kv_heads=2, max_position_embeddings=4 * context_len, seed=0)
    reqs = work / "requests.jsonl"
    _requests(reqs, context_len, vocab=512)
    block = -(-context_len // nproc)
    common = [f"checkpoint.hf_path={model}", f"inference.input_path={reqs}", "inference.save_logits=true",
              f"inference.block_size={block}", f"inference.anchor_size={block}"]
    runs = {
        "none": (1, ["inference.context_parallel_mode=none", "model.context_parallel_size=1"]),
        "ring": (nproc, ["inference.context_parallel_mode=ring", f"model.context_parallel_size={nproc}"]),
        "star": (nproc, ["inference.context_parallel_mode=star", f"model.context_parallel_size={nproc}"]),
    }
    results = {}
    for name, (n, extra) in runs.items():
        out = work / f"out_{name}.jsonl"
        _launch(n, common + extra + [f"inference.output_path={out}"])
        results[name] = _read(out)

    print(f"\nstar vs ring vs none: {context_len}-token contexts, {nproc} hosts, block = anchor = {block}")
    print(f"{'mode':6} {'request':8} {'same as none':>14} {'max |logit - none|':>19} {'phase1 s':>9} {'phase2 s':>9}")
    ref = results["none"]
    for name, res in results.items():
        for rid, r in res.items():
            mine, theirs = r["generated_ids"], ref[rid]["generated_ids"]
            same = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs)))
            agree = f"{same}/{len(mine)}"
            diff = (torch.tensor(r["first_step_logits"]) - torch.tensor(ref[rid]["first_step_logits"])).abs().max()
            print(f"{name:6} {rid:8} {agree:>14} {diff.item():19.2e} "
                  f"{r['phase1_s']:9.3f} {r['phase2_s']:9.3f}")
    print("'same as none': generated tokens equal to none's before the first difference. ring is exact global\n"
          "attention (logits equal up to float rounding); star approximates phase 1 with anchor blocks, so its\n"
          "logits differ a little and greedy tokens of this random model may part ways. CPU timings with more\n"
          "ranks than cores say nothing about GPU speed.")
    return 0
