"""End to end on several GPUs of one host (or gloo ranks on a CPU): the engine's prefill (phase 1) and decode
(phase 2) times of ``none``, ``ring`` and ``star`` on a real TP x CP world, a Llama-shaped model with random
weights and as many layers as asked, and the checks that ring's and star's phase 2 agree with one softmax
over all hosts' KV.

    torchrun --nproc-per-node=8 scripts/bench_e2e.py --tp 2 --cp 4 --out docs/bench/e2e_tp2cp4.json
    torchrun --nproc-per-node=8 scripts/bench_e2e.py --tp 1 --cp 8 --out docs/bench/e2e_tp1cp8.json
    torchrun --nproc-per-node=4 scripts/bench_e2e.py --device cpu --tp 2 --cp 2 --smoke --precision fp32 --out x.json

Per context length the block is ``ceil(context / cp)`` (one block per host), star's anchor is ``block / f`` for
each ``--anchors`` fraction ``f``, and every setting runs ``--reps`` times (median). ``none`` (exact global
attention, one host) runs on every host at once with a second set of groups whose CP group is the rank
alone (the same TP group): it is the reference of the first-step logits and tokens. Rows report
  phase1_s           the slowest host's phase 1 (the engine's max over all ranks), also per layer in ms;
  first_token_s      phase 2's query pass (the first token), decode_ms_per_token the steps after it;
  max_dlogit_vs_none max |first-step logit - none's| on the query host (ring: bf16/fp32 rounding; star: its
                     phase-1 approximation), tokens_equal_none;
  phase2_exact_err   star only: per layer, max |phase 2's merged attention output - one float64 softmax over
                     the union of every host's KV (+ the query causally)|, i.e. phase 2 is exact whatever
                     phase 1 put in the caches;
  peak_mem_gib       per rank, CUDA only.
Global rank 0 writes the JSON after every row (``complete`` false until the sweep ends) and prints one line
per row. Any failure: one line ``bench_e2e: rank R: ...`` on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import traceback
from pathlib import Path
from typing import Dict, List, Optional

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.config import InferenceConfig  # noqa: E402
from star_mcore.inference.engine import Engine  # noqa: E402
from star_mcore.inference.modes import GlobalAttention, StarAttention, context_parallel_mode  # noqa: E402
from star_mcore.inference.kv_cache import KVSequence  # noqa: E402
from star_mcore.inference.steps import QueryStep  # noqa: E402
from star_mcore.parallel.groups import (  # noqa: E402
    ParallelGroups, destroy_parallel, init_process_group, initialize_parallel, reduce_max)

SMOKE = dict(shape="tiny", layers=2, lengths="64,128", query=4, new_tokens=3, reps=1)


def parse(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tp", type=int, default=1)
    ap.add_argument("--cp", type=int, default=0, help="default: world size / tp")
    ap.add_argument("--device", default="auto", help="auto | cuda | cpu (gloo)")
    ap.add_argument("--shape", default="llama3.1-8b", choices=sorted(benchlib.SHAPES))
    ap.add_argument("--layers", type=int, default=0, help="default: the shape's own layer count")
    ap.add_argument("--lengths", default="32768,65536,131072,262144", help="context lengths, comma separated")
    ap.add_argument("--modes", default="none,ring,star")
    ap.add_argument("--anchors", default="1,4", help="star anchor = block / f for each f")
    ap.add_argument("--partitions", default="uniform,balanced")
    ap.add_argument("--anchor-modes", default="shared", help="shared,recompute")
    ap.add_argument("--query", type=int, default=32, help="query tokens")
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs of every setting at the first length")
    ap.add_argument("--precision", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--decode", default="graph", choices=["graph", "static", "eager"], help="inference.decode")
    ap.add_argument("--none-max", type=int, default=0, help="skip the none reference above this context (0: never)")
    ap.add_argument("--check-max", type=int, default=131072,
                    help="star phase-2 exactness check up to this context (0: never; it gathers all hosts' KV)")
    ap.add_argument("--timeout", type=float, default=3600, help="collective timeout, seconds")
    ap.add_argument("--smoke", action="store_true",
                    help="defaults for a check anywhere: "
                    + " ".join(f"--{k.replace('_', '-')} {v}" for k, v in SMOKE.items()))
    if "--smoke" in (sys.argv[1:] if argv is None else argv):
        ap.set_defaults(**SMOKE)  # smoke defaults; options given explicitly still win
    args = ap.parse_args(argv)
    args.lengths = [int(x) for x in str(args.lengths).split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    args.anchors = [int(x) for x in args.anchors.split(",") if x]
    args.partitions = [p for p in args.partitions.split(",") if p]
    args.anchor_modes = [m for m in args.anchor_modes.split(",") if m]
    bad = set(args.modes) - {"none", "ring", "star"}
    if bad or not args.modes:
        raise ValueError(f"--modes: unknown {sorted(bad)} (none, ring, star)")
    if any(f < 1 for f in args.anchors) or not args.lengths or min(args.lengths) < 1:
        raise ValueError("--anchors fractions and --lengths must be positive")
    return args


# ----------------------------------------------------------------------------------------------- groups


def cp_alone(groups: ParallelGroups) -> ParallelGroups:
    """The same TP group with a CP group of this rank alone, for mode none on every host at once. Every rank
    creates every singleton group, in the same order (new_group is collective over the world)."""
    mine = None
    for r in range(dist.get_world_size()):
        g = dist.new_group([r])
        if r == dist.get_rank():
            mine = g
    return ParallelGroups(pg_collection=groups.pg_collection, tp=groups.tp, cp=mine, device=groups.device)


def gather_per_rank(value: float, device: torch.device) -> List[float]:
    t = torch.tensor([value], dtype=torch.float64, device=device)
    out = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(out, t)
    return [x.item() for x in out]


def gather_seq(t: torch.Tensor, group: dist.ProcessGroup) -> List[torch.Tensor]:
    """Every CP host's [b, h, n_i, d] (n_i may differ) on every host: lengths, then a padded all-gather."""
    n = torch.tensor([t.shape[2]], dtype=torch.long, device=t.device)
    ns = [torch.empty_like(n) for _ in range(group.size())]
    dist.all_gather(ns, n, group=group)
    ns = [int(x) for x in ns]
    pad = t.new_zeros(t.shape[:2] + (max(ns),) + t.shape[3:])
    pad[:, :, : t.shape[2]] = t
    out = [torch.empty_like(pad) for _ in ns]
    dist.all_gather(out, pad.contiguous(), group=group)
    return [o[:, :, :m] for o, m in zip(out, ns)]


# ------------------------------------------------------------------------------- star phase 2 vs global


def global_attention(q, ks, vs, scale: float, n_ctx: int) -> torch.Tensor:
    """One float64 softmax: query i [b, hq, s, d] sees all ``n_ctx`` context keys and query keys 0..i
    (ks, vs [b, hk, n_ctx + s, d]; GQA by grouping the query heads, KV never repeated)."""
    b, hq, s, d = q.shape
    hk = ks.shape[1]
    qg = q.double().reshape(b, hk, hq // hk, s, d)
    scores = torch.einsum("bgrsd,bgnd->bgrsn", qg, ks.double()) * scale
    mask = torch.ones(s, n_ctx + s, dtype=torch.bool, device=q.device)
    mask[:, n_ctx:] = torch.ones(s, s, dtype=torch.bool, device=q.device).tril()
    probs = torch.softmax(scores.masked_fill(~mask, float("-inf")), -1)
    return torch.einsum("bgrsn,bgnd->bgrsd", probs, vs.double()).reshape(b, hq, s, d)


class GlobalCheck:
    """Wraps phase 2's QueryStep: per layer, every host's context KV is gathered and the merged output is
    compared, on every host, with :func:`global_attention` over all of it."""

    def __init__(self, step: QueryStep, cache: KVSequence, groups: ParallelGroups, n_ctx: int) -> None:
        self.step, self.cache, self.groups, self.n_ctx, self.worst = step, cache, groups, n_ctx, 0.0

    def __call__(self, layer, q, k, v, scale):
        ck, cv = self.cache.get(layer, like=k)
        every_k, every_v = gather_seq(ck, self.groups.cp), gather_seq(cv, self.groups.cp)
        out = self.step(layer, q, k, v, scale)
        ks, vs = torch.cat(every_k + [k], dim=2), torch.cat(every_v + [v], dim=2)
        if ks.shape[2] != self.n_ctx + q.shape[2]:
            raise AssertionError(f"the hosts' caches hold {ks.shape[2] - q.shape[2]} context tokens, "
                                 f"not {self.n_ctx}: every context token must be held once")
        ref = global_attention(q, ks, vs, scale, self.n_ctx)
        self.worst = max(self.worst, (out.double() - ref).abs().max().item())
        return out


def star_phase2_error(engine: Engine, ctx: torch.Tensor, qry: torch.Tensor) -> float:
    """Star phase 1, then one phase-2 pass of the query under :class:`GlobalCheck`; max error over all ranks."""
    g, m = engine.groups, engine.model
    pool = engine.reserve(2 + -(-(max(engine.context_shares(len(ctx))) + len(qry)) // engine.inference.kv_page_size))
    cache = pool.allocate(engine.context_share(len(ctx)))
    own = pool.allocate(len(qry)) if g.is_query_host else None
    try:
        engine.prefill(ctx, cache)
        check = GlobalCheck(QueryStep(engine.host.attn, cache, own, g.cp), cache, g, len(ctx))
        with torch.inference_mode(), m.attending(check):
            m.hidden(qry, torch.arange(len(ctx), len(ctx) + len(qry)))
    finally:
        pool.release(cache)
        if own is not None:
            pool.release(own)
    return reduce_max([check.worst], g.device)[0]


# ------------------------------------------------------------------------------------------------ sweep


def settings_for(args, n: int, cp: int) -> List[dict]:
    """The settings of one context length: each a row's labels plus the ``inference`` config it runs."""
    block = -(-n // cp)
    common = dict(tokens_to_generate=args.new_tokens, attention_backend=args.backend, decode=args.decode)
    out = []
    for mode in args.modes:
        if mode == "none":
            if not args.none_max or n <= args.none_max:
                out.append(dict(mode="none", block=n, anchor=0, anchor_fraction=None, partition=None, anchor_mode=None,
                                inference=InferenceConfig(context_parallel_mode="none", **common)))
        elif mode == "ring":
            out.append(dict(mode="ring", block=block, anchor=0, anchor_fraction=None, partition=None, anchor_mode=None,
                            inference=InferenceConfig(context_parallel_mode="ring", **common)))
        else:
            for am in args.anchor_modes:
                for part in args.partitions:
                    for f in args.anchors:
                        a = max(1, block // f)
                        out.append(dict(mode="star", block=block, anchor=a, anchor_fraction=f, partition=part,
                                        anchor_mode=am, inference=InferenceConfig(
                                            context_parallel_mode="star", block_size=block, anchor_size=a,
                                            anchor_mode=am, partition=part, **common)))
    return out


def run_setting(engine: Engine, ctx, qry, reps: int, warmup: int) -> dict:
    """``reps`` timed generations (median of each figure, max over ranks), the first step's logits on the
    query host, the tokens, and this rank's peak CUDA memory."""
    dev = engine.groups.device
    for _ in range(warmup):
        engine.generate(ctx, qry)
    samples, first = [], None
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    for rep in range(reps):
        gen = engine.generate(ctx, qry, save_logits=rep == 0)
        if first is None:
            first = gen
        t = gen.timings
        steps = len(gen.generated_ids) - 1
        decode = (t["phase2_s"] - t["first_token_s"]) / steps if steps else float("nan")
        # phase1_s is already the max over ranks; phase 2 is max-reduced here (mode none: hosts run alone).
        samples.append([t["phase1_s"]] + reduce_max([t["phase2_s"], t["first_token_s"], decode], dev))
    med = [statistics.median(s[i] for s in samples) for i in range(4)]
    peak = torch.cuda.max_memory_allocated(dev) / 2**30 if dev.type == "cuda" else None
    return dict(phase1_s=med[0], phase2_s=med[1], first_token_s=med[2], decode_ms_per_token=med[3] * 1e3,
                samples=samples, tokens=first.generated_ids, logits=first.first_step_logits, peak_gib=peak)


def main(argv=None) -> None:
    args = parse(argv)
    benchlib.env_flags()
    kind = benchlib.device_kind(args.device)
    device = init_process_group("gpu" if kind == "cuda" else "cpu", args.timeout)
    world, rank = dist.get_world_size(), dist.get_rank()
    cp = args.cp or world // args.tp
    if args.tp * cp != world:
        raise ValueError(f"--tp {args.tp} x --cp {cp} must equal the world size {world}")
    groups = initialize_parallel(args.tp, cp, device, args.timeout)
    alone = cp_alone(groups) if "none" in args.modes else None
    shape = benchlib.SHAPES[args.shape]
    layers = args.layers or shape["layers"]
    vocab = 1000 if args.shape == "tiny" else 128256
    # Identical weights on every CP host of a TP rank: the seed is the TP rank.
    model = benchlib.layer_model(args.shape, groups, args.precision, seed=1000 + groups.tp_rank, layers=layers,
                                 vocab=vocab)
    payload = dict(hardware=benchlib.hardware(), world=world, tp=args.tp, cp=cp, shape=args.shape, shape_dims=shape,
                   layers=layers, vocab=vocab, precision=args.precision, backend=args.backend, decode=args.decode,
                   device=kind,
                   query_tokens=args.query, new_tokens=args.new_tokens, reps=args.reps,
                   nccl_nvls_enable=os.environ.get("NCCL_NVLS_ENABLE"), complete=False, rows=[])
    for li, n in enumerate(args.lengths):
        gen = torch.Generator().manual_seed(n)  # the same ids on every rank
        ctx = torch.randint(0, vocab, (n,), generator=gen)
        qry = torch.randint(0, vocab, (args.query,), generator=gen)
        ref: Optional[dict] = None
        for s in settings_for(args, n, cp):
            inference = s.pop("inference")
            reference = isinstance(context_parallel_mode(inference), GlobalAttention)  # runs alone on every host
            engine = Engine(model, alone if reference else groups, inference)
            r = run_setting(engine, ctx, qry, args.reps, args.warmup if li == 0 else 0)
            if reference:
                ref = r
            row: Dict[str, object] = dict(context=n, **s, phase1_s=r["phase1_s"],
                                          phase1_ms_per_layer=r["phase1_s"] / layers * 1e3, phase2_s=r["phase2_s"],
                                          first_token_s=r["first_token_s"],
                                          decode_ms_per_token=r["decode_ms_per_token"], samples=r["samples"])
            if ref is not None and not reference:
                # first_step_logits: on the query host of this setting's groups (none: every rank).
                d = (r["logits"] - ref["logits"]).abs().max().item() if engine.groups.is_query_host else -1.0
                row.update(max_dlogit_vs_none=reduce_max([d], device)[0],
                           tokens_equal_none=r["tokens"] == ref["tokens"],
                           first_token_equal_none=r["tokens"][:1] == ref["tokens"][:1])
            if isinstance(engine.mode, StarAttention) and args.check_max and n <= args.check_max:
                row["phase2_exact_err"] = star_phase2_error(engine, ctx, qry)
            row["tokens"] = r["tokens"]
            if device.type == "cuda":
                row["peak_mem_gib"] = [round(x, 3) for x in gather_per_rank(r["peak_gib"], device)]
            payload["rows"].append(row)
            if rank == 0:
                print(line(row), flush=True)
                benchlib.write_json(args.out, payload, announce=False)  # the partial file after each row
    payload["complete"] = True
    if rank == 0:
        benchlib.write_json(args.out, payload)
    dist.barrier()
    destroy_parallel()


def line(row: dict) -> str:
    name = row["mode"] if row["mode"] != "star" else (f"star/{row['anchor_mode']}/{row['partition']}/"
                                                       f"a=b/{row['anchor_fraction']}")
    parts = [f"n={row['context']}", f"{name:<30}", f"block={row['block']}", f"anchor={row['anchor']}",
             f"phase1={row['phase1_s']:.4f}s ({row['phase1_ms_per_layer']:.2f} ms/layer)",
             f"first_token={row['first_token_s']:.4f}s", f"decode={row['decode_ms_per_token']:.2f} ms/tok"]
    if "max_dlogit_vs_none" in row:
        parts.append(f"|dlogit|={row['max_dlogit_vs_none']:.3g} tokens==none:{row['tokens_equal_none']}")
    if "phase2_exact_err" in row:
        parts.append(f"phase2_err={row['phase2_exact_err']:.3g}")
    if "peak_mem_gib" in row:
        parts.append(f"peak={max(row['peak_mem_gib']):.2f} GiB")
    return "  ".join(parts)


if __name__ == "__main__":
    try:
        main()
    except SystemExit:
        raise
    except BaseException as e:  # noqa: BLE001 - one clear line, the trace only with BENCH_E2E_TRACE=1
        if os.environ.get("BENCH_E2E_TRACE"):
            traceback.print_exc()
        msg = " ".join(str(e).split()) or "(no message)"
        print(f"bench_e2e: rank {os.environ.get('RANK', '0')}: {type(e).__name__}: {msg[:500]}", file=sys.stderr,
              flush=True)
        sys.exit(1)
