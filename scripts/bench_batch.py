"""Batched phase 2 on one GPU (CP 1: one host holds each request's whole share): ms per decode step and tokens/s
for B requests decoding together, beside the step's memory floor (every weight once, plus every KV the step
must read: each request's own share, or a shared context once), at the bandwidth measured in the same run.

Rows: B requests over separate contexts (``--shares``), B questions over one shared context (``--shared``), and a
workload of ``--workload`` requests with seeded context and answer lengths run with ``max_batch_size`` 1 and 16
(requests/s end to end, phase 1 included). In the step rows phase 1 leaves random K, V (benchlib.random_phase1);
the per-step time is the slope between two budgets, so admission, query passes and graph captures drop out.

    python scripts/bench_batch.py --out docs/bench/batch.json
    python scripts/bench_batch.py --profile 1:16384,16:16384 --out docs/bench/batch_profile.json  # where a step goes
    python scripts/bench_batch.py --smoke --out /tmp/x.json     # CPU check of the script
"""

from __future__ import annotations

import argparse
import gc
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402
from bench_decode_floor import bandwidth, step_bytes  # noqa: E402

from star_mcore.config import InferenceConfig  # noqa: E402
from star_mcore.inference.batch import ContinuousBatch, Job  # noqa: E402
from star_mcore.inference.engine import Engine, Sampling  # noqa: E402
from star_mcore.inference.planner import pool_pages  # noqa: E402


def _sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def run_jobs(engine: Engine, jobs, pages=None, out=None) -> float:
    """Seconds to answer ``jobs`` through one batch (a pool of ``pages`` pages: default, what they need at once);
    their Generations are appended to ``out`` when given."""
    dev = engine.groups.device
    _sync(dev)
    t0 = time.perf_counter()
    out = [] if out is None else out
    ContinuousBatch(engine).run(jobs, lambda job, gen: out.append(gen), pages)
    _sync(dev)
    assert all(not isinstance(g, Exception) for g in out), [g for g in out if isinstance(g, Exception)][:1]
    return time.perf_counter() - t0


def step_row(args, model, groups, batch: int, kv_share: int, shared: bool, bw: float) -> dict:
    """ms per step of ``batch`` requests decoding together (slope between the two budgets, median of reps)."""
    vocab = model.arch.vocab_size
    g = torch.Generator().manual_seed(batch * 7 + kv_share)
    contexts = [torch.randint(0, vocab, (kv_share,), generator=g)] * batch if shared else \
        [torch.randint(0, vocab, (kv_share,), generator=g) for _ in range(batch)]
    queries = [torch.randint(0, vocab, (args.query,), generator=g) for _ in range(batch)]
    engine = Engine(model, groups, InferenceConfig(context_parallel_mode="none", decode=args.decode,
                                                   max_batch_size=batch, attention_backend=args.backend))
    benchlib.random_phase1(engine)
    lo, hi = args.budgets
    jobs = lambda n: [Job(c, q, Sampling(n)) for c, q in zip(contexts, queries)]  # noqa: E731
    run_jobs(engine, jobs(lo))  # warm-up: kernels compiled, graphs captured
    times = {lo: [], hi: []}
    for _ in range(args.reps):
        for n in (lo, hi):
            times[n].append(run_jobs(engine, jobs(n)))
    med = {n: sorted(t)[len(t) // 2] for n, t in times.items()}
    per_step = (med[hi] - med[lo]) / (hi - lo)
    kv = kv_share * (1 if shared else batch) + batch * (args.query + (lo + hi) // 2)  # + each request's own tokens
    floor_s = step_bytes(model, kv) / bw if bw == bw else float("nan")
    row = dict(batch=batch, kv_share=kv_share, shared_context=shared, ms_per_step=per_step * 1e3,
               tokens_per_s=batch / per_step, floor_ms_per_step=floor_s * 1e3,
               x_floor=per_step / floor_s if floor_s == floor_s else None,
               graph_captures=getattr(engine.decoder, "captures", 0))
    _free(engine)
    return row


def _free(engine: Engine) -> None:
    """Give the engine's pool and graphs back before the next row allocates its own."""
    engine.pool = engine.decoder = engine.prefill = None
    gc.collect()
    if engine.groups.device.type == "cuda":
        torch.cuda.empty_cache()


def profile_row(args, model, groups, batch: int, kv_share: int) -> dict:
    """Where a batched step's time goes: the loop's ms per step against its CUDA graph replayed back to back (the
    GPU's own time: the rest is the host's, between replays), the sampler alone (all its work, drawing without
    a filter, greedy), and the static step's kernels by GPU time (torch profiler)."""
    from torch.profiler import ProfilerActivity, profile

    from star_mcore.ops.sampling import SamplerWork, SamplingParams, sample

    dev = groups.device
    vocab = model.arch.vocab_size
    g = torch.Generator().manual_seed(batch)
    contexts = [torch.randint(0, vocab, (kv_share,), generator=g) for _ in range(batch)]
    queries = [torch.randint(0, vocab, (args.query,), generator=g) for _ in range(batch)]
    jobs = lambda n: [Job(c, q, Sampling(n)) for c, q in zip(contexts, queries)]  # noqa: E731
    out = dict(batch=batch, kv_share=kv_share)
    for loop in ("graph", "static"):
        engine = Engine(model, groups, InferenceConfig(context_parallel_mode="none", decode=loop,
                                                       max_batch_size=batch, attention_backend=args.backend))
        benchlib.random_phase1(engine)
        lo, hi = args.budgets
        run_jobs(engine, jobs(lo))
        t = {n: sorted(run_jobs(engine, jobs(n)) for _ in range(3))[1] for n in (lo, hi)}
        out[f"{loop}_loop_ms_per_step"] = (t[hi] - t[lo]) / (hi - lo) * 1e3
        if loop == "graph" and dev.type == "cuda" and engine.decoder._graphs:
            graph = next(iter(engine.decoder._graphs.values()))  # replays past the end write the scratch page
            out["graph_replay_ms"] = benchlib.timed(lambda: [graph.replay() for _ in range(10)], dev, 2, 5) * 100
        if loop == "static":
            activities = [ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]
            totals = {}
            for n in (lo, hi):
                with profile(activities=activities) as prof:
                    run_jobs(engine, jobs(n))
                totals[n] = {e.key: (e.count, e.device_time_total if dev.type == "cuda" else e.self_cpu_time_total)
                             for e in prof.key_averages()}
            rows = []
            for key, (c1, t1) in totals[hi].items():
                c0, t0 = totals[lo].get(key, (0, 0.0))
                count, ms = (c1 - c0) / (hi - lo), (t1 - t0) / (hi - lo) / 1e3
                if count > 0 and ms > 0:
                    rows.append(dict(kernel=key[:90], per_step=round(count, 2), ms_per_step=round(ms, 4)))
            rows.sort(key=lambda r: -r["ms_per_step"])
            out["static_busy_ms_per_step"] = round(sum(r["ms_per_step"] for r in rows), 4)
            out["static_kernels_per_step"] = round(sum(r["per_step"] for r in rows), 1)
            out["static_top"] = rows[:30]
        _free(engine)
    logits = torch.randn(batch, vocab, device=dev)
    params = SamplingParams.allocate(batch, dev)
    for name, work in (("sampler_full_ms", SamplerWork()), ("sampler_draw_ms", SamplerWork(True, False, False)),
                       ("sampler_greedy_ms", SamplerWork(False, False, False))):
        out[name] = benchlib.timed(lambda: sample(logits, params, work), dev, 3, 10) * 1e3
    return out


def workload_row(args, model, groups, max_batch: int, room: int, kv_token: int) -> dict:
    """``--workload`` requests (seeded: context in [lo, hi] tokens, answer in [lo, hi] tokens), end to end with
    phase 1 really run: requests/s and generated tokens/s. The pool holds what ``max_batch`` of the largest need
    at once, capped by ``room`` bytes (as the runner's planner caps it): admission waits for pages beyond."""
    rnd = random.Random(0)
    vocab = model.arch.vocab_size
    c_lo, c_hi = args.workload_context
    n_lo, n_hi = args.workload_new
    jobs = []
    for _ in range(args.workload):
        ctx = torch.tensor([rnd.randrange(vocab) for _ in range(rnd.randint(c_lo, c_hi))])
        jobs.append(Job(ctx, torch.tensor([rnd.randrange(vocab) for _ in range(args.query)]),
                        Sampling(rnd.randint(n_lo, n_hi))))
    engine = Engine(model, groups, InferenceConfig(context_parallel_mode="none", decode=args.decode,
                                                   max_batch_size=max_batch, attention_backend=args.backend))
    page = engine.inference.kv_page_size
    pages = pool_pages(engine.mode, 1, page, max_batch, [j.footprint for j in jobs], room // (page * kv_token))
    run_jobs(engine, jobs[:2], pages)  # warm-up
    gens = []
    seconds = run_jobs(engine, jobs, pages, gens)
    new = sum(j.sampling.tokens_to_generate for j in jobs)
    phase1 = sum(g.timings["phase1_s"] for g in gens)  # the batch waits while each runs: the part batching keeps
    row = dict(max_batch_size=max_batch, requests=len(jobs), pool_pages=pages, seconds=seconds,
               requests_per_s=len(jobs) / seconds, generated_tokens_per_s=new / seconds,
               phase1_s=phase1, phase1_share=phase1 / seconds)
    _free(engine)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--decode", default="graph")
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--batches", default="1,4,16,32")
    ap.add_argument("--shares", default="16384,32768")
    ap.add_argument("--shared", default="131072:1,8,32", help="context:batches of the shared-context rows (\"\": none)")
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--budgets", default="16,48", help="the two budgets of the slope")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--workload", type=int, default=64, help="requests of the workload rows (0: none)")
    ap.add_argument("--workload-context", default="8192,32768")
    ap.add_argument("--workload-new", default="64,512")
    ap.add_argument("--workload-batches", default="1,16", help="max_batch_size of each workload row")
    ap.add_argument("--memory-gib", type=float, default=0, help="skip rows whose KV exceeds this (0: the GPU's)")
    ap.add_argument("--profile", default="", help="batch:share[,batch:share...]: only profile these steps")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, short contexts: checks the script anywhere")
    args = ap.parse_args()
    if args.smoke:
        args.shape, args.layers, args.batches, args.shares, args.shared = "tiny", 2, "1,3", "64", "96:1,3"
        args.budgets, args.reps, args.workload, args.query = "3,6", 1, 5, 4
        args.workload_context, args.workload_new = "20,60", "2,6"
    args.budgets = tuple(map(int, args.budgets.split(",")))
    args.workload_context = tuple(map(int, args.workload_context.split(",")))
    args.workload_new = tuple(map(int, args.workload_new.split(",")))
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    vocab = 1000 if args.shape == "tiny" else 128256
    model = benchlib.layer_model(args.shape, groups, "bf16" if dev.type == "cuda" else "fp32", layers=args.layers,
                                 vocab=vocab)
    bw = bandwidth(dev)
    a = model.arch
    kv_token = a.num_layers * 2 * a.num_kv_heads * a.head_dim * torch.finfo(model.dtype).bits // 8
    weights = sum(p.numel() * p.element_size() for p in model.gpt.parameters())
    memory = (args.memory_gib * 2 ** 30 if args.memory_gib else
              torch.cuda.get_device_properties(dev).total_memory if dev.type == "cuda" else 2 ** 40)
    room = memory - weights - 8 * 2 ** 30  # activations, graphs, the allocator's slack
    payload = dict(hardware=benchlib.hardware(), shape=args.shape, layers=args.layers, decode=args.decode,
                   bandwidth_gbps=bw / 1e9, query_tokens=args.query, budgets=list(args.budgets), rows=[],
                   workload=[])
    if args.profile:
        payload["profile"] = []
        for case in args.profile.split(","):
            b, n = map(int, case.split(":"))
            payload["profile"].append(profile_row(args, model, groups, b, n))
            p = payload["profile"][-1]
            print(f"profile batch {b} x {n}: " + ", ".join(f"{k} {v:.3f}" for k, v in p.items()
                                                           if isinstance(v, float)), flush=True)
            benchlib.write_json(args.out, payload, announce=False)
        benchlib.write_json(args.out, payload)
        return
    ints = lambda text: [int(x) for x in text.split(",") if x]  # noqa: E731 ("" : none)
    cases = [(b, n, False) for n in ints(args.shares) for b in ints(args.batches)]
    if args.shared:
        ctx, batches = args.shared.split(":")
        cases += [(b, int(ctx), True) for b in ints(batches)]
    for b, n, shared in cases:
        need = (n * (1 if shared else b) + b * (args.query + max(args.budgets))) * kv_token
        if need > room:
            print(f"batch {b} x {n} tokens{' (shared)' if shared else ''}: {need / 2 ** 30:.0f} GiB of KV does not "
                  "fit; skipped", flush=True)
            continue
        row = step_row(args, model, groups, b, n, shared, bw)
        payload["rows"].append(row)
        print(f"batch {b:3} x {n:7}{' shared' if shared else '       '}: {row['ms_per_step']:8.3f} ms/step, "
              f"{row['tokens_per_s']:9.1f} tok/s, floor {row['floor_ms_per_step']:8.3f} ms", flush=True)
        benchlib.write_json(args.out, payload, announce=False)
    if args.workload:
        for mb in ints(args.workload_batches) if not args.smoke else (1, 3):
            row = workload_row(args, model, groups, mb, room, kv_token)
            payload["workload"].append(row)
            print(f"workload max_batch_size={mb}: {row['requests_per_s']:.3f} requests/s, "
                  f"{row['generated_tokens_per_s']:.1f} generated tokens/s, phase 1 {row['phase1_share']:.0%} of "
                  f"the time", flush=True)
            benchlib.write_json(args.out, payload, announce=False)
    benchlib.write_json(args.out, payload)


if __name__ == "__main__":
    main()
