"""Phase 2 against the memory floor: ms per generated token of the engine's decode loops on one GPU, beside the floor
(every weight the step reads plus the host's KV, once, at the bandwidth measured in the same run) and, optionally,
HF transformers with a static cache under torch.compile.

A host's phase 2 reads its own KV share: ``kv_share`` = context (CP 1) and context / 8 (the query host of 8 hosts;
on one GPU the merge's all-gather is absent, one small collective per layer on real hosts). The cache is filled with
random K, V (phase 1 is not what is timed: benchlib.random_phase1), the query pass and the decode loop are the
engine's own (``Engine.generate``, a batch of one). Per-token cost is the slope between two budgets, so the one-off
costs (the first decode step, the graph capture) are reported apart, as ``overhead_s``.

    python scripts/bench_decode_floor.py --out docs/bench/decode_floor.json [--hf llama3.1-8b]
    python scripts/bench_decode_floor.py --out docs/bench/decode_te.json --cases llama3.1-8b:32:32768 \
        --loops graph --transformer-impls local,transformer_engine --profile    # TE's fused layers beside mcore's
    python scripts/bench_decode_floor.py --smoke --out /tmp/x.json          # CPU check of the script
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
from star_mcore.inference.engine import Engine  # noqa: E402

GiB = 2 ** 30


def bandwidth(device: torch.device) -> float:
    """Bytes per second of a large device-to-device copy (bytes read + written)."""
    if device.type != "cuda":
        return float("nan")
    x = torch.empty(2 * GiB, dtype=torch.uint8, device=device)
    y = torch.empty_like(x)
    t = benchlib.timed(lambda: y.copy_(x), device, warmup=3, reps=10)
    x = y = None  # freed (not del: the closure above reads them)
    return 2 * 2 * GiB / t


def step_bytes(model, kv_share: int) -> int:
    """Bytes one decode step must read: every weight but the embedding table (one row of it), and the KV."""
    a = model.arch
    weights = sum(p.numel() * p.element_size() for n, p in model.gpt.named_parameters() if "embedding" not in n)
    kv = a.num_layers * 2 * a.num_kv_heads * a.head_dim * kv_share * torch.finfo(model.dtype).bits // 8
    return weights + kv


def time_answer(engine: Engine, kv_share: int, query, budget: int) -> dict:
    """One request over a ``kv_share``-token context of random K, V (benchlib.random_phase1)."""
    gen = engine.generate(torch.zeros(kv_share, dtype=torch.long), query, tokens_to_generate=budget)
    assert len(gen.generated_ids) == budget, "no EOS ids: every run generates its whole budget"
    return gen.timings


def engine_rows(args, model, groups, kv_share: int) -> dict:
    """Per-token decode cost (slope between two budgets, median of reps) for the graph and eager loops."""
    dev = groups.device
    query = torch.randint(0, model.arch.vocab_size, (args.query,), generator=torch.Generator().manual_seed(1))
    out = {}
    for loop in args.loops:
        lo, hi = args.eager_budgets if loop == "eager" else args.budgets
        engine = Engine(model, groups, InferenceConfig(context_parallel_mode="none", decode=loop,
                                                       attention_backend=args.backend, max_batch_size=1))
        benchlib.random_phase1(engine)
        time_answer(engine, kv_share, query, lo)  # warm-up: kernels compiled, the graph captured
        runs = {b: [] for b in (lo, hi)}
        for _ in range(args.reps):
            for b in (lo, hi):
                runs[b].append(time_answer(engine, kv_share, query, b))
        med = {b: {k: sorted(r[k] for r in runs[b])[len(runs[b]) // 2] for k in ("phase2_s", "first_token_s")}
               for b in runs}
        per_token = ((med[hi]["phase2_s"] - med[hi]["first_token_s"])
                     - (med[lo]["phase2_s"] - med[lo]["first_token_s"])) / (hi - lo)
        overhead = (med[lo]["phase2_s"] - med[lo]["first_token_s"]) - (lo - 1) * per_token
        out[loop] = dict(ms_per_token=per_token * 1e3, first_token_s=med[lo]["first_token_s"], overhead_s=overhead,
                         graph_used=getattr(engine.decoder, "replays", 0) > 0)
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return out


def profile_static_step(args, model, groups, kv_share: int, steps: int = 8) -> dict:
    """GPU time of one static decode step by kernel (torch profiler, the static loop: the same kernels a graph
    replays, without the launch gaps; on CPU, ops' own CPU time). Returns {busy_ms_per_step, kernels_per_step,
    top: [...]}."""
    from torch.profiler import ProfilerActivity, profile

    dev = groups.device
    query = torch.randint(0, model.arch.vocab_size, (args.query,), generator=torch.Generator().manual_seed(1))
    engine = Engine(model, groups, InferenceConfig(context_parallel_mode="none", decode="static",
                                                   attention_backend=args.backend, max_batch_size=1))
    benchlib.random_phase1(engine)
    time_answer(engine, kv_share, query, 4)
    activities = [ProfilerActivity.CUDA if dev.type == "cuda" else ProfilerActivity.CPU]
    with profile(activities=activities) as prof:
        time_answer(engine, kv_share, query, 1)  # the query pass alone, subtracted below
    base = {e.key: (e.count, e.device_time_total if dev.type == "cuda" else e.self_cpu_time_total)
            for e in prof.key_averages()}
    with profile(activities=activities) as prof:
        time_answer(engine, kv_share, query, steps + 1)
    rows = []
    for e in prof.key_averages():
        c0, t0 = base.get(e.key, (0, 0.0))
        total = e.device_time_total if dev.type == "cuda" else e.self_cpu_time_total
        count, t = (e.count - c0) / steps, (total - t0) / steps / 1e3
        if count > 0 and t > 0:
            rows.append(dict(kernel=e.key[:90], per_step=round(count, 2), ms_per_step=round(t, 4)))
    rows.sort(key=lambda r: -r["ms_per_step"])
    return dict(busy_ms_per_step=round(sum(r["ms_per_step"] for r in rows), 4),
                kernels_per_step=round(sum(r["per_step"] for r in rows), 1), top=rows[:25])


def hf_static_compiled(shape: str, layers: int, vocab: int, context: int, budgets, device) -> float:
    """ms per token of HF LlamaForCausalLM (random bf16 weights) with a static cache of ``context`` + budget
    slots, decoding under torch.compile (transformers compiles the forward for static caches); the slope between
    two budgets after a short prompt (a static cache reads all its slots whatever their fill)."""
    from transformers import LlamaConfig, LlamaForCausalLM, StaticCache

    s = benchlib.SHAPES[shape]
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                      num_hidden_layers=layers, num_attention_heads=s["num_heads"],
                      num_key_value_heads=s["num_kv_heads"],
                      head_dim=s["head_dim"], max_position_embeddings=context + 4096, rope_theta=500000.0)
    with torch.device(device):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16).eval()
    prompt = torch.randint(0, vocab, (1, 32), device=device)
    lo, hi = budgets

    def run(n):
        torch.cuda.synchronize()
        t = time.perf_counter()
        cache = StaticCache(config=cfg, max_cache_len=context + hi + 64)  # a compileable cache: generate compiles
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, past_key_values=cache)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    for n in (lo, hi, lo):  # compile and warm up both
        run(n)
    t_lo = sorted(run(lo) for _ in range(3))[1]
    t_hi = sorted(run(hi) for _ in range(3))[1]
    model = None  # freed (not del: the closure above reads it)
    torch.cuda.empty_cache()
    return (t_hi - t_lo) / (hi - lo) * 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--backend", default="auto", help="the query pass's (and eager decode's) attention backend")
    ap.add_argument("--cases", default="llama3.1-8b:32:32768,llama3.1-8b:32:131072,llama3.1-70b:48:32768,"
                    "llama3.1-70b:48:131072", help="shape:layers:context, comma separated (70B: 48 of 80 layers fit)")
    ap.add_argument("--hosts", type=int, default=8, help="the second kv_share is context / hosts")
    ap.add_argument("--loops", default="graph,eager")
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--budgets", default="16,80", help="two token budgets; per-token cost is their slope")
    ap.add_argument("--eager-budgets", default="4,12", help="the same for the (slow) eager loop")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--hf", default="", help="shapes to also run in HF transformers (static cache + torch.compile)")
    ap.add_argument("--transformer-impls", default="local",
                    help="model.transformer_impl values, comma separated: local, transformer_engine")
    ap.add_argument("--profile", action="store_true",
                    help="kernel breakdown of the static step (first case of each transformer_impl)")
    ap.add_argument("--smoke", action="store_true", help="tiny shape, short contexts: checks the script anywhere")
    args = ap.parse_args()
    if args.smoke:
        args.cases, args.budgets, args.eager_budgets = "tiny:2:256,tiny:2:512", "3,6", "3,6"
        args.reps, args.query = 1, 4
    args.loops = args.loops.split(",")
    args.budgets = [int(x) for x in args.budgets.split(",")]
    args.eager_budgets = [int(x) for x in args.eager_budgets.split(",")]
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    bw = bandwidth(dev)
    payload = {"hardware": dict(benchlib.hardware(), copy_bandwidth_gb_s=round(bw / 1e9, 1)),
               "loops": args.loops, "budgets": args.budgets, "eager_budgets": args.eager_budgets,
               "query_tokens": args.query, "rows": []}
    print(f"copy bandwidth {bw / 1e9:.0f} GB/s", flush=True)
    built, model = None, None
    for impl, case in ((i, c) for i in args.transformer_impls.split(",") for c in args.cases.split(",")):
        shape, layers, context = case.split(":")
        layers, context = int(layers), int(context)
        vocab = 1000 if shape == "tiny" else 128256
        if built != (impl, shape, layers):
            model = None
            model = benchlib.layer_model(shape, groups, "bf16" if dev.type == "cuda" else "fp32", layers=layers,
                                         vocab=vocab, transformer_impl=impl)
            built = (impl, shape, layers)
        for kv_share in (context, context // args.hosts):
            r = engine_rows(args, model, groups, kv_share)
            floor = step_bytes(model, kv_share) / bw * 1e3
            row = dict(shape=shape, layers=layers, context=context, kv_share=kv_share, transformer_impl=impl,
                       decode_ms_per_token=round(r[args.loops[0]]["ms_per_token"], 4),
                       floor_ms_per_token=round(floor, 4),
                       eager_ms_per_token=round(r["eager"]["ms_per_token"], 4) if "eager" in r else None,
                       first_token_s=round(r[args.loops[0]]["first_token_s"], 5),
                       x_floor=round(r[args.loops[0]]["ms_per_token"] / floor, 3) if floor == floor else None,
                       step_bytes=step_bytes(model, kv_share), loops=r)
            if shape in args.hf.split(",") and kv_share == context and dev.type == "cuda":
                model = None  # room for HF's copy of the weights
                torch.cuda.empty_cache()
                try:
                    row["hf_static_compiled_ms_per_token"] = round(
                        hf_static_compiled(shape, layers, vocab, context, args.budgets, dev), 4)
                except Exception as e:  # noqa: BLE001 - HF is a comparison: its failure must not lose the row
                    row["hf_error"] = f"{type(e).__name__}: {str(e)[:300]}"
                    torch.cuda.empty_cache()
                model = benchlib.layer_model(shape, groups, "bf16", layers=layers, vocab=vocab, transformer_impl=impl)
            if args.profile and not any(r["transformer_impl"] == impl for r in payload["rows"]):
                row["profile"] = profile_static_step(args, model, groups, kv_share)
                print(f"static step: {row['profile']['busy_ms_per_step']} ms of kernels, "
                      f"{row['profile']['kernels_per_step']} kernels", flush=True)
                for k in row["profile"]["top"][:14]:
                    print(f"  {k['ms_per_step']:8.4f} ms  x{k['per_step']:6.1f}  {k['kernel']}", flush=True)
            payload["rows"].append(row)
            print(f"{impl} {shape} x{layers} ctx={context} kv_share={kv_share}: "
                  f"decode {row['decode_ms_per_token']:.2f} ms/token (floor {row['floor_ms_per_token']:.2f}, "
                  f"eager {row['eager_ms_per_token']}, "
                  f"HF compiled {row.get('hf_static_compiled_ms_per_token')}), first token "
                  f"{row['first_token_s'] * 1e3:.1f} ms", flush=True)
            benchlib.write_json(args.out, payload, announce=False)
    benchlib.write_json(args.out, payload)


if __name__ == "__main__":
    main()
