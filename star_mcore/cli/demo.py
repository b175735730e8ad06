"""The README's main job: the shipped probe model answers needle-in-a-haystack questions under none, ring and
star (torchrun, like a user would launch it); then their answers, agreement and timings side by side."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, List, Optional

import torch

from ..errors import RunError
from ..eval.tasks import TASKS
from ..inference.requests import Tokenizer

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "configs" / "demo_cpu.yaml"
PROBE = ROOT / "models" / "probe"
DEMO_TASKS = ("niah_single_1", "niah_single_2", "niah_multikey_1")


def _requests(path: Path, model: Path, context_len: int) -> Dict[str, List[str]]:
    """NIAH prompts from the eval generators (seeded), as text requests; returns each one's answers."""
    tok = Tokenizer(str(model))
    refs = {}
    with open(path, "w") as f:
        for i, name in enumerate(DEMO_TASKS):
            s = TASKS[name].make(seed=7, index=i, length=context_len, tok=tok)
            f.write(json.dumps({"id": name, "context": s.context, "query": s.query}) + "\n")
            refs[name] = s.references
    return refs


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


def run_demo(workdir: str, nproc: int = 4, context_len: int = 4096, model: Optional[str] = None) -> int:
    model = model or str(PROBE)
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    reqs = work / "requests.jsonl"
    refs = _requests(reqs, Path(model), context_len)
    block = -(-context_len // nproc)
    common = [f"checkpoint.hf_path={model}", f"inference.input_path={reqs}", "inference.save_logits=true",
              f"inference.block_size={block}", f"inference.anchor_size={block}", "inference.tokens_to_generate=12"]
    runs = {
        "none": (1, ["inference.context_parallel_mode=none", "model.context_parallel_size=1"]),
        "ring": (nproc, ["inference.context_parallel_mode=ring", f"model.context_parallel_size={nproc}"]),
        "star": (nproc, ["inference.context_parallel_mode=star", f"model.context_parallel_size={nproc}"]),
    }
    results = {}
    for name, (n, extra) in runs.items():
        out = work / f"out_{name}.jsonl"
        out.unlink(missing_ok=True)  # a fresh run each time (generate would resume a finished file)
        _launch(n, common + extra + [f"inference.output_path={out}"])
        results[name] = _read(out)

    print(f"\nThe probe model (models/probe) on {context_len}-token needle-in-a-haystack prompts; "
          f"{nproc} hosts, block = anchor = {block} tokens")
    print(f"{'mode':5} {'task':16} {'answer':22} {'right':>5} {'same as none':>12} {'max |dlogit|':>12} "
          f"{'phase1 s':>8} {'phase2 s':>8}")
    ref = results["none"]
    for name, res in results.items():
        for rid, r in res.items():
            answer = r["text"].strip().split("\n")[0][:22]
            right = all(x.lower() in r["text"].lower() for x in refs[rid])
            diff = (torch.tensor(r["first_step_logits"]) - torch.tensor(ref[rid]["first_step_logits"])).abs().max()
            print(f"{name:5} {rid:16} {answer:22} {'yes' if right else 'no':>5} "
                  f"{'yes' if r['generated_ids'] == ref[rid]['generated_ids'] else 'no':>12} {diff.item():12.2e} "
                  f"{r['phase1_s']:8.3f} {r['phase2_s']:8.3f}")
    print("ring is exact global attention (logits equal to none's up to float rounding); star approximates phase 1\n"
          "with anchor blocks, so its logits differ a little. CPU timings with more ranks than cores say nothing\n"
          "about GPU speed: docs/performance.md has the H100 numbers.")
    return 0
