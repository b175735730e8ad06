"""The memory planner against measured GPU memory: real engine runs (phase 1 + a few decode steps) of
Llama-8B/70B-shaped models with random bf16 weights and a few layers, on one GPU (a CP=1 host; star with
several blocks on the host), vs ``star-mcore plan``'s estimate. Each case starts from an empty cache
(``torch.cuda.empty_cache``), so its figures are those of a fresh process: peak allocated (tensors), peak
reserved (the caching allocator's segments) and the device memory in use at the end (what nvidia-smi shows:
reserved + the CUDA context).

    python scripts/bench_memory.py --out docs/bench/memory.json
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.config import load_config  # noqa: E402
from star_mcore.config import InferenceConfig  # noqa: E402
from star_mcore.inference.engine import Engine  # noqa: E402
from star_mcore.inference.planner import plan  # noqa: E402
from star_mcore.model.arch import LlamaArch  # noqa: E402

QUERY, NEW = 32, 4
# (shape, layers, context, mode, block, anchor, anchor_mode)
CASES = [
    ("llama3.1-8b", 4, 16384, "none", 0, 0, "shared"),
    ("llama3.1-8b", 4, 65536, "none", 0, 0, "shared"),
    ("llama3.1-8b", 4, 131072, "none", 0, 0, "shared"),
    ("llama3.1-8b", 4, 131072, "star", 32768, 32768, "shared"),
    ("llama3.1-8b", 4, 131072, "star", 32768, 32768, "recompute"),
    ("llama3.1-8b", 4, 262144, "star", 32768, 8192, "shared"),
    ("llama3.1-70b", 2, 32768, "none", 0, 0, "shared"),
    ("llama3.1-70b", 2, 131072, "star", 32768, 32768, "recompute"),
]
SMOKE = [("tiny", 2, 256, "none", 0, 0, "shared"), ("tiny", 2, 512, "star", 128, 64, "recompute")]


def estimate(arch: LlamaArch, n: int, mode: str, block: int, anchor: int, anchor_mode: str):
    cfg = load_config(None, ["checkpoint.hf_path=unused", "inference.input_path=x", "inference.output_path=y",
                             "model.precision=bf16", "trainer.accelerator=gpu",
                             f"inference.context_parallel_mode={mode}",
                             f"inference.block_size={block or n}", f"inference.anchor_size={anchor}",
                             f"inference.anchor_mode={anchor_mode}", f"inference.tokens_to_generate={NEW}"])
    return plan(cfg, arch, n, QUERY)


def main() -> None:
    ap = argparse.ArgumentParser()
    benchlib.common_args(ap)
    args = ap.parse_args()
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    cases = SMOKE if args.smoke else CASES
    # Device memory in use before any tensor: the CUDA context and the process groups' buffers.
    baseline = (lambda f, t: t - f)(*torch.cuda.mem_get_info()) if dev.type == "cuda" else 0
    rows, model, built = [], None, None
    for shape, layers, n, mode, block, anchor, anchor_mode in cases:
        if built != (shape, layers):
            model = None  # the last model goes before the next is built
            model = benchlib.layer_model(shape, groups, "bf16", layers=layers,
                                         vocab=128256 if shape != "tiny" else 1000)
            built = (shape, layers)
        engine = Engine(model, groups, InferenceConfig(
            context_parallel_mode=mode, block_size=block or n, anchor_size=anchor, tokens_to_generate=NEW,
            attention_backend=args.backend, anchor_mode=anchor_mode))
        g = torch.Generator().manual_seed(n)
        ctx = torch.randint(0, model.arch.vocab_size, (n,), generator=g).to(dev)
        qry = torch.randint(0, model.arch.vocab_size, (QUERY,), generator=g).to(dev)
        if dev.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
        engine.generate(ctx, qry)
        est = estimate(model.arch, n, mode, block, anchor, anchor_mode)
        row = dict(shape=shape, layers=layers, context=n, mode=mode, block=block, anchor=anchor,
                   anchor_mode=anchor_mode, plan_weights=est.weights, plan_kv=est.kv_cache,
                   plan_activations=est.activations, plan_total=est.total)
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated()
            free, total = torch.cuda.mem_get_info()
            row.update(measured_weights=before, measured_peak=peak, measured_reserved=torch.cuda.max_memory_reserved(),
                       device_used=total - free,
                       plan_over_allocated=round((est.weights + est.kv_cache + est.activations) / peak, 3),
                       plan_over_device_used=round(est.total / (total - free), 3))
        rows.append(row)
        print({k: (round(v / 2**30, 3) if isinstance(v, int) and v > 2**20 else v) for k, v in row.items()}, flush=True)
    benchlib.write_json(args.out, {"hardware": benchlib.hardware(), "backend": args.backend, "baseline_used": baseline,
                                   "alloc_conf": os.environ.get("PYTORCH_CUDA_ALLOC_CONF", ""),
                                   "query_tokens": QUERY, "new_tokens": NEW, "rows": rows})


if __name__ == "__main__":
    main()
