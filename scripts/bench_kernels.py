"""Attention kernel efficiency: achieved TFLOP/s of every available (out, lse) backend on phase-1 shapes
(a block causally; a block against an anchor, unmasked), bf16, against the GPU's bf16 peak.

    python scripts/bench_kernels.py --out docs/bench/kernels.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.ops.attention import BACKENDS, attend, resolve_backend  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--blocks", default="4096,16384,32768,65536")
    ap.add_argument("--heads", default="32,8", help="query heads, KV heads (Llama-3.1-8B per GPU at TP=1)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--backends", default=",".join(BACKENDS), help="comma separated; those that cannot run are skipped")
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.blocks, args.reps = "256", 1
    dev = torch.device(benchlib.device_kind(args.device))
    dtype = torch.bfloat16
    hq, hk = map(int, args.heads.split(","))
    d = 128
    gpu = benchlib.hardware().get("gpu", "cpu")
    peak = next((v for k, v in benchlib.BF16_PEAK_TFLOPS.items() if k in gpu), None)
    results = {"hardware": benchlib.hardware(), "bf16_peak_tflops": peak, "rows": []}
    for name in args.backends.split(","):
        try:
            fn = resolve_backend(name, dev, dtype)
        except ValueError as e:  # not on this device, or its library is not installed
            print(f"{name:15} skipped: {e}", flush=True)
            continue
        for b in map(int, args.blocks.split(",")):
            if name == "math" and b > 16384:
                continue  # materialises the score matrix
            for kind, sq, sk, causal in (("causal block", b, b, True), ("block x anchor", b, b, False)):
                q = torch.randn(1, hq, sq, d, device=dev, dtype=dtype)
                k = torch.randn(1, hk, sk, d, device=dev, dtype=dtype)
                v = torch.randn(1, hk, sk, d, device=dev, dtype=dtype)
                try:
                    t = benchlib.timed(lambda: attend(fn, q, k, v, causal=causal), dev, warmup=2, reps=args.reps)
                except RuntimeError as e:  # a kernel that does not take this shape/dtype
                    results["rows"].append({"backend": name, "kind": kind, "block": b, "error": str(e)[:200]})
                    print(f"{name:15} {kind:15} b={b:>6}: unavailable ({str(e)[:80]})", flush=True)
                    continue
                flops = 4 * sq * sk * hq * d * (0.5 if causal else 1.0)
                tflops = flops / t / 1e12
                row = {"backend": name, "kind": kind, "block": b, "seconds": round(t, 7), "tflops": round(tflops, 1),
                       "fraction_of_peak": round(tflops / peak, 3) if peak else None}
                results["rows"].append(row)
                print(f"{name:15} {kind:15} b={b:>6}: {t * 1e3:9.3f} ms {tflops:7.1f} TFLOP/s"
                      + (f" ({100 * row['fraction_of_peak']:.0f}% of peak)" if peak else ""), flush=True)
    benchlib.write_json(args.out, results)


if __name__ == "__main__":
    main()
