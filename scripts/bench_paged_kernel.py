"""The batched decode step's paged attention kernel alone (one layer, the 8B shape's heads), on the layouts the
static step builds: B slots over separate contexts, or B questions over one shared context (read once for all),
each slot with its own few tokens. Microseconds per call and the bandwidth of the keys and values read once,
for each tile setting of the Triton kernel (query rows a program holds, warps, pipeline stages), with the
compiled kernel's registers and spills: the data behind its defaults.

    python scripts/bench_paged_kernel.py --out docs/bench/paged_kernel.json
    python scripts/bench_paged_kernel.py --smoke --out /tmp/x.json   # CPU check (TRITON_INTERPRET=1)
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.ops.paged_attention import PagedLayout, paged_attention_triton, split_count  # noqa: E402
from star_mcore.ops.triton_kernels import paged_split_kv_attention  # noqa: E402


def layout(batch: int, context: int, shared: bool, own: int, page: int, hk: int, sms: int, dev):
    """The static step's layout (2 * batch groups: contexts first, then each slot's own tokens) over a pool whose
    pages are laid out one sequence after another. Returns (layout, pages in the pool)."""
    n_ctx = 1 if shared else batch
    ctx_pages, own_pages = -(-context // page), -(-own // page)
    width = max(ctx_pages, own_pages)
    G, M = 2 * batch, 1 << (batch - 1).bit_length() if shared else 1
    table = torch.zeros(G, width, dtype=torch.int32)
    lens = torch.zeros(G, dtype=torch.int32)
    members = torch.full((G, M), -1, dtype=torch.long)
    part = torch.zeros(G, dtype=torch.long)
    nxt = 1  # page 0: scratch
    for j in range(n_ctx):
        table[j, :ctx_pages] = torch.arange(nxt, nxt + ctx_pages, dtype=torch.int32)
        nxt += ctx_pages
        lens[j] = context
    for s in range(batch):
        members[0 if shared else s, s if shared else 0] = s
        table[batch + s, :own_pages] = torch.arange(nxt, nxt + own_pages, dtype=torch.int32)
        nxt += own_pages
        lens[batch + s], members[batch + s, 0], part[batch + s] = own, s, 1
    lay = PagedLayout(table.to(dev), lens.to(dev), members.to(dev), part.to(dev), n_parts=2,
                      splits=split_count(n_ctx, hk, sms))
    return lay, nxt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--heads", default="32,8,128", help="query heads, KV heads, head dim")
    ap.add_argument("--cases", default="131072:1s,131072:8s,131072:16s,131072:32s,16384:1,16384:16,32768:32",
                    help="context:batch[s] (s: one shared context)")
    ap.add_argument("--tiles", default="16:4,32:4,64:4,64:8,128:8",
                    help="rows_per_program:num_warps[:num_stages]")
    ap.add_argument("--own", type=int, default=64, help="each slot's own tokens")
    ap.add_argument("--page", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    ap.add_argument("--smoke", action="store_true")
    args = ap.parse_args()
    if args.smoke:
        args.heads, args.cases, args.tiles, args.own, args.page, args.reps = "4,2,16", "40:3s,20:2", "16:4", 3, 16, 1
    hq, hk, d = map(int, args.heads.split(","))
    dev = torch.device(benchlib.device_kind(args.device))
    dtype = torch.bfloat16 if dev.type == "cuda" else torch.float32
    sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
    payload = dict(hardware=benchlib.hardware(), heads=[hq, hk, d], dtype=str(dtype), own=args.own, page=args.page,
                   rows=[])
    for case in args.cases.split(","):  # each case's pool replaces the last one's
        ctx, b = case.split(":")
        shared, batch, context = b.endswith("s"), int(b.rstrip("s")), int(ctx)
        lay, pages = layout(batch, context, shared, args.own, args.page, hk, sms, dev)
        kp = torch.randn(hk, pages, args.page, d, device=dev).to(dtype)
        vp = torch.randn_like(kp)
        q = torch.randn(batch, hk, hq // hk, d, device=dev).to(dtype)
        read = (context * (1 if shared else batch) + batch * args.own) * hk * d * 2 * kp.element_size()
        for tile in args.tiles.split(","):
            rows, warps, *stages = map(int, tile.split(":"))
            launch = dict(rows_per_program=rows, num_warps=warps, num_stages=stages[0] if stages else None)
            call = lambda: paged_attention_triton(q, kp, vp, lay, d ** -0.5, **launch)  # noqa: E731
            s = benchlib.timed(call, dev, 0 if args.smoke else 2, args.reps)
            parts = torch.zeros(2 * lay.splits, batch, hk, hq // hk, d, device=dev)
            compiled = paged_split_kv_attention(q, kp, vp, lay.table, lay.lens, lay.members, lay.part, lay.splits,
                                                d ** -0.5, parts, parts[..., 0].clone(), **launch)
            row = dict(context=context, batch=batch, shared_context=shared, splits=lay.splits, **launch,
                       registers=getattr(compiled, "n_regs", None), spills=getattr(compiled, "n_spills", None),
                       us_per_call=s * 1e6, kv_gbps=read / s / 1e9)
            payload["rows"].append(row)
            print(f"{context:7} x {batch:3}{' shared' if shared else '       '} {tile:>8}: "
                  f"{row['us_per_call']:9.1f} us, {row['kv_gbps']:7.0f} GB/s, registers {row['registers']}, "
                  f"spills {row['spills']}", flush=True)
        benchlib.write_json(args.out, payload, announce=False)
    benchlib.write_json(args.out, payload)


if __name__ == "__main__":
    main()
