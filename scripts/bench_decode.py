"""Phase-2 decode step: one generated token through one layer, a host holding N/P context tokens of KV
(local attention + the exact merge of P partials) vs one device holding all N; the merge's share.

The all-gather of the packed partials (P x heads x (head_dim + 1) floats per layer) is modelled with a
latency + bandwidth model and reported beside the measured compute.

    python scripts/bench_decode.py --out docs/bench/decode.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.ops.attention import attend, attend_prefix_causal, resolve_backend  # noqa: E402
from star_mcore.ops.merge import merge_partials  # noqa: E402

LINK = {"nvlink": (10e-6, 450e9), "infiniband": (25e-6, 50e9)}  # (latency s, bytes/s) per all-gather step


class HostDecode:
    """A host's phase-2 attention for one new token: local KV (no mask) [+ the token itself on the query
    host], then the merge of ``p`` partials (the all-gather itself is modelled, not run)."""

    def __init__(self, fn, ck, cv, p):
        self.fn, self.ck, self.cv, self.p = fn, ck, cv, p

    def __call__(self, layer, q, k, v, scale):
        out, lse = attend_prefix_causal(self.fn, q, self.ck, self.cv, k, v, scale=scale)
        if self.p > 1:
            out, lse = merge_partials(out.float().expand(self.p, *out.shape), lse.expand(self.p, *lse.shape))
        return out.to(q.dtype)


def main() -> None:
    ap = argparse.ArgumentParser()
    benchlib.common_args(ap)
    ap.add_argument("--lengths", default="32768,131072,524288,1048576")
    ap.add_argument("--hosts", default="1,4,8,16,32")
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.hosts, args.reps = "tiny", "512", "1,4", 2
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    results = {"hardware": benchlib.hardware(), "backend": args.backend, "link_model": LINK, "rows": []}
    for shape in args.shapes.split(","):
        model = benchlib.layer_model(shape, groups)
        s = benchlib.SHAPES[shape]
        attn = resolve_backend(args.backend, dev, model.dtype)
        hq, hk, d = s["num_heads"], s["num_kv_heads"], s["head_dim"]
        for n in map(int, args.lengths.split(",")):
            for p in map(int, args.hosts.split(",")):
                local = n // p
                kv = torch.randn(2, 1, hk, local, d, device=dev, dtype=model.dtype)
                ids = torch.randint(0, 32000, (1,), device=dev)
                pos = torch.tensor([n], device=dev)

                def step():
                    with model.attending(HostDecode(attn, kv[0], kv[1], p)):
                        model.hidden(ids, pos)

                q = torch.randn(1, hq, 1, d, device=dev, dtype=model.dtype)
                o, l = attend(attn, q, kv[0], kv[1])
                outs, lses = o.float().expand(p, *o.shape), l.expand(p, *l.shape)
                with torch.inference_mode():
                    t_step = benchlib.timed(step, dev, warmup=3, reps=args.reps)
                    t_merge = (benchlib.timed(lambda: merge_partials(outs, lses), dev, warmup=3, reps=args.reps)
                               if p > 1 else 0.0)
                gather_bytes = p * hq * (d + 1) * 4
                comm = {k: (lat * max(1, (p - 1).bit_length()) + gather_bytes / bw) if p > 1 else 0.0
                        for k, (lat, bw) in LINK.items()}
                row = {"shape": shape, "context": n, "hosts": p, "local_kv_tokens": local,
                       "step_per_layer_s": round(t_step, 8), "merge_per_layer_s": round(t_merge, 8),
                       "merge_share": round(t_merge / t_step, 4), "gather_bytes_per_layer": gather_bytes,
                       "gather_model_s": {k: round(v, 8) for k, v in comm.items()}}
                results["rows"].append(row)
                print(f"{shape:13} N={n:>8} P={p:>2} step {t_step * 1e6:8.1f} us/layer, merge {t_merge * 1e6:6.1f} us "
                      f"({100 * row['merge_share']:.1f}%)", flush=True)
                kv = None  # freed before the next size (closures above read it: not del)
        model = None  # freed before the next shape is built (closures above read it: not del)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    benchlib.write_json(args.out, results)


if __name__ == "__main__":
    main()
