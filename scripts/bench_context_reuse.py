"""Phase 1 once, many queries: ``--questions`` requests over one context answered in a row, each re-encoding its
context (``Engine.generate``) and sharing one phase 1 (one ``ContinuousBatch`` of one slot: the context stays
resident between its requests, what ``star-mcore generate`` does with ``inference.max_batch_size=1``). One GPU (CP
1), a Llama-shaped model with random bf16 weights.

    python scripts/bench_context_reuse.py --out docs/bench/context_reuse.json
    python scripts/bench_context_reuse.py --smoke --out /tmp/x.json     # CPU check of the script
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.config import InferenceConfig  # noqa: E402
from star_mcore.inference.batch import ContinuousBatch, Job  # noqa: E402
from star_mcore.inference.engine import Engine, Sampling  # noqa: E402


def run(engine: Engine, context, questions, reuse: bool) -> dict:
    """Answer every question; wall time of the whole series and each request's timings and tokens."""
    dev = engine.groups.device
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    t0 = time.perf_counter()
    if reuse:
        gens = []
        jobs = [Job(context, q, Sampling(engine.inference.tokens_to_generate)) for q in questions]
        ContinuousBatch(engine).run(jobs, lambda job, gen: gens.append(gen))
    else:
        gens = [engine.generate(context, q) for q in questions]
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    total = time.perf_counter() - t0
    return dict(total_s=total, phase1_s=[g.timings["phase1_s"] for g in gens],
                phase2_s=[g.timings["phase2_s"] for g in gens], reused=[g.context_reused for g in gens],
                tokens=[g.generated_ids for g in gens])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", default="32768,131072")
    ap.add_argument("--modes", default="none,star", help="star: blocks of context/8 on the one host")
    ap.add_argument("--questions", type=int, default=8)
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, short contexts: checks the script anywhere")
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.layers, args.contexts, args.questions, args.query, args.new_tokens = "tiny", 2, "256", 3, 4, 3
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    vocab = 1000 if args.shape == "tiny" else 128256
    model = benchlib.layer_model(args.shape, groups, "bf16" if dev.type == "cuda" else "fp32", layers=args.layers,
                                 vocab=vocab)
    payload = dict(hardware=benchlib.hardware(), shape=args.shape, layers=args.layers, questions=args.questions,
                   query_tokens=args.query, new_tokens=args.new_tokens, rows=[])
    for n in map(int, args.contexts.split(",")):
        g = torch.Generator().manual_seed(n)
        context = torch.randint(0, vocab, (n,), generator=g)
        questions = [torch.randint(0, vocab, (args.query,), generator=g) for _ in range(args.questions)]
        for mode in args.modes.split(","):
            engine = Engine(model, groups, InferenceConfig(context_parallel_mode=mode, block_size=-(-n // 8),
                                                           anchor_size=-(-n // 8), tokens_to_generate=args.new_tokens,
                                                           max_batch_size=1))
            engine.generate(context[: min(n, 4096)], questions[0])  # warm-up: kernels, graph machinery
            alone = run(engine, context, questions, reuse=False)
            reused = run(engine, context, questions, reuse=True)
            row = dict(context=n, mode=mode, total_alone_s=alone["total_s"], total_reuse_s=reused["total_s"],
                       speedup=alone["total_s"] / reused["total_s"], same_tokens=alone["tokens"] == reused["tokens"],
                       reused=reused["reused"], alone=alone, reuse=reused)
            payload["rows"].append(row)
            print(f"{mode:5} ctx={n}: {args.questions} questions alone {alone['total_s']:.2f} s, with reuse "
                  f"{reused['total_s']:.2f} s ({row['speedup']:.1f}x), same tokens: {row['same_tokens']}", flush=True)
            benchlib.write_json(args.out, payload, announce=False)
    benchlib.write_json(args.out, payload)


if __name__ == "__main__":
    main()
