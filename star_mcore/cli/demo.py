"""The README's main job: a real pretrained model (SmolLM2-135M-Instruct, made by ``make-smollm2`` on first use)
answers text prompts through its chat template under none, ring and star (torchrun, like a user would launch
it); then their answers, agreement and timings side by side."""

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
# Generated prompts (seeded): a needle in an essay, a person's place among other facts (BABILong qa1), the
# asked key's needle among distractor needles.
DEMO_TASKS = ("niah_single_2", "qa1", "niah_multikey_1")


def _requests(path: Path, tok: Tokenizer, context_len: int) -> Dict[str, List[str]]:
    """Prompts from the eval generators, fitted to ``context_len`` tokens inside the chat template, written as
    text requests; returns each one's answers."""
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


def run_demo(workdir: str, nproc: int = 4, context_len: int = 2048, model: Optional[str] = None) -> int:
    if model is None:
        from ..model.smollm2 import make_smollm2

        model = str(make_smollm2())
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)
    reqs = work / "requests.jsonl"
    tok = Tokenizer(model, chat=True)
    if not tok.has_chat_template():
        raise RunError(f"--model {model}: the demo needs a tokenizer with a chat template")
    refs = _requests(reqs, tok, context_len)
    block = -(-context_len // nproc)
    common = [f"checkpoint.hf_path={model}", f"inference.input_path={reqs}", "inference.save_logits=true",
              "inference.apply_chat_template=true", f"inference.block_size={block}", f"inference.anchor_size={block}",
              "inference.tokens_to_generate=32"]
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

    print(f"\n{Path(model).name} on {context_len}-token prompts in its chat template; {nproc} hosts, "
          f"block = anchor = {block} tokens")
    print(f"{'mode':5} {'task':16} {'answer':40} {'right':>5} {'same as none':>12} {'max |dlogit|':>12} "
          f"{'phase1 s':>8} {'phase2 s':>8}")
    ref = results["none"]
    for name, res in results.items():
        for rid, r in res.items():
            if "error" in r:
                print(f"{name:5} {rid:16} error: {r['error']}")
                continue
            answer = " ".join(r["text"].split())
            answer = answer if len(answer) <= 40 else "..." + answer[-37:]  # the end holds the answer
            right = all(x.lower() in r["text"].lower() for x in refs[rid])
            diff = (torch.tensor(r["first_step_logits"]) - torch.tensor(ref[rid]["first_step_logits"])).abs().max()
            print(f"{name:5} {rid:16} {answer:40} {'yes' if right else 'no':>5} "
                  f"{'yes' if r['generated_ids'] == ref[rid]['generated_ids'] else 'no':>12} {diff.item():12.2e} "
                  f"{r['phase1_s']:8.3f} {r['phase2_s']:8.3f}")
    print("ring is exact global attention (logits equal to none's up to float rounding); star approximates phase 1\n"
          "with anchor blocks, so its logits differ a little. CPU timings with more ranks than cores say nothing\n"
          "about GPU speed: docs/performance.md has the H100 and H200 numbers.")
    return 0
