"""Phase-1 critical path per host: none, ring, star (recompute | shared anchor, uniform | balanced,
anchor = block, /2, /4, /8), with the real model code on one device. ``--contexts`` adds star's remedies for
small blocks (``inference.star_context``, #23): a longer anchor (2b, 4b), the previous block, landmarks, each
with its phase-1 FLOPs per host.

Every host of a scheme runs its own work on the one GPU, one after the other; the critical path is the
slowest host. One decoder layer of the model's shape is timed (all layers are alike: multiply by the layer
count). Ring's per-host compute is this project's ring attention loop (every step's kernels and merges,
the other hosts' KV taken from random tensors); its KV transfers are modelled from bytes and bandwidth.

    python scripts/bench_phase1.py --out docs/bench/phase1.json            # on a GPU
    python scripts/bench_phase1.py --smoke --out /tmp/p1.json               # tiny, any device
    python scripts/bench_phase1.py --contexts --lengths 131072 --hosts 8 --out docs/bench/phase1_contexts.json
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import benchlib  # noqa: E402

from star_mcore.inference.kv_cache import KVPool  # noqa: E402
from star_mcore.inference.modes import StarAttention  # noqa: E402
from star_mcore.inference.steps import EncodeSegment, EncodeWithAnchor, EncodeWithPrevious, SharedAnchor  # noqa: E402
from star_mcore.ops.attention import accumulate_ring_step, resolve_backend  # noqa: E402
from star_mcore.ops.layout import ring_chunk_ids, ring_chunks, star_block_tokens, star_layout  # noqa: E402

BANDWIDTH_GBPS = {"nvlink": 450.0, "infiniband": 50.0}  # per GPU, one direction (H100 NVLink 4 / NDR 400G)


class RingHost:
    """One ring host's attention work in one layer, without the network: its two query chunks against
    every host's two KV chunks, step by step, exactly the kernel calls and merges of ring_attention."""

    def __init__(self, fn, cache, n: int, p: int, rank: int, full_k, full_v):
        self.fn, self.cache, self.p, self.rank = fn, cache, p, rank
        self.chunks, self.full_k, self.full_v = ring_chunks(n, p), full_k, full_v

    def __call__(self, layer, q, k, v, scale):
        mine = self.chunks[self.rank]
        q_parts = torch.split(q, (len(mine[0]), len(mine[1])), dim=2)
        acc = [None, None]
        for step in range(self.p):
            owner = (self.rank - step) % self.p
            if owner == self.rank:
                sizes = (len(mine[0]), len(mine[1]))
                kp, vp = torch.split(k, sizes, 2), torch.split(v, sizes, 2)
            else:
                kp = [self.full_k[:, :, c.start:c.end] for c in self.chunks[owner]]
                vp = [self.full_v[:, :, c.start:c.end] for c in self.chunks[owner]]
            accumulate_ring_step(self.fn, acc, q_parts, ring_chunk_ids(self.rank, self.p), kp, vp,
                                 ring_chunk_ids(owner, self.p), scale)
        self.cache.append(layer, k, v)
        return torch.cat([a[0] for a in acc], dim=2)


class ReceivedKV:
    """Stands in for :class:`NeighbourKV` on one device: the previous host's block arrives as random K, V (its
    transfer is modelled from bytes and bandwidth, like ring's)."""

    def __init__(self, k, v):
        self.kv = (k, v)

    def post(self, k, v) -> None:
        pass

    def received(self):
        return self.kv

    def finish(self) -> None:
        pass


# star_context candidates: (row name, star_context, anchor in blocks, (landmarks, landmark size) or None)
CONTEXTS = [("star_anchor", "anchor", 1, None),
            ("star_long_anchor_2b", "long_anchor", 2, None), ("star_long_anchor_4b", "long_anchor", 4, None),
            ("star_previous", "anchor+previous", 1, None), ("star_landmarks_4x64", "anchor+landmarks", 1, (4, 64)),
            ("star_landmarks_8x128", "anchor+landmarks", 1, (8, 128))]


def layer_flops(s: dict, tokens: int, pairs: int) -> int:
    """One layer's matmul FLOPs: ``tokens`` through the projections and MLP, ``pairs`` (query, key) scores."""
    h, d = s["hidden_size"], s["head_dim"]
    weights = h * (s["num_heads"] + 2 * s["num_kv_heads"]) * d + s["num_heads"] * d * h + 3 * h * s["intermediate_size"]
    return 2 * tokens * weights + 4 * s["num_heads"] * d * pairs


def main() -> None:
    ap = argparse.ArgumentParser()
    benchlib.common_args(ap)
    ap.add_argument("--lengths", default="16384,32768,131072,262144,524288,1048576")
    ap.add_argument("--hosts", default="4,8,16,32")
    ap.add_argument("--none-max", type=int, default=262144, help="longest context the single-device run is timed at")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--contexts", action="store_true", help="also the star_context candidates of #23")
    args = ap.parse_args()
    if args.smoke:
        args.shapes, args.lengths, args.hosts, args.none_max, args.reps = "tiny", "256,512", "4,8", 512, 1
    benchlib.env_flags()
    groups = benchlib.setup(benchlib.device_kind(args.device))
    dev = groups.device
    results = {"hardware": benchlib.hardware(), "backend": args.backend, "bandwidth_gbps": BANDWIDTH_GBPS, "rows": []}
    for shape in args.shapes.split(","):
        model = benchlib.layer_model(shape, groups)
        attn = resolve_backend(args.backend, dev, model.dtype)
        s = benchlib.SHAPES[shape]
        kv_bytes_per_token = 2 * s["num_kv_heads"] * s["head_dim"] * 2  # K and V, bf16, one layer
        cache_times = {}

        def run_tokens(key, n_tokens, make_step):
            if key not in cache_times:
                ids = torch.randint(0, 32000, (n_tokens,), device=dev)
                pos = torch.arange(n_tokens, device=dev)

                def fn():  # the layer's K, V into a sequence of a fresh pool, as phase 1 writes them
                    pool = KVPool(1, 2 + -(-n_tokens // 256), 256, s["num_kv_heads"], s["head_dim"], model.dtype, dev)
                    with model.attending(make_step(pool.allocate(n_tokens))):
                        model.hidden(ids, pos)

                try:
                    with torch.inference_mode():
                        cache_times[key] = benchlib.timed(fn, dev, reps=args.reps)
                except torch.OutOfMemoryError:  # one GPU at TP=1 holds less than a TP-sharded host
                    cache_times[key] = float("nan")
                    if dev.type == "cuda":
                        torch.cuda.empty_cache()
            return cache_times[key]

        def causal(t):
            return run_tokens(("causal", t), t, lambda c: EncodeSegment(attn, c))

        def random_kv(n):
            kv = torch.randn(2, 1, s["num_kv_heads"], n, s["head_dim"], device=dev, dtype=model.dtype)
            return kv[0], kv[1]

        def shared(t, a, n_drop=0):  # a forward of t tokens (n_drop re-encoded landmarks first) after the anchor
            anchor = SharedAnchor(1, None)
            anchor.kv[0] = random_kv(a)
            return run_tokens(("shared", t, a, n_drop), t, lambda c: EncodeWithAnchor(attn, c, anchor, n_drop))

        def previous(blk, a, prev):  # one block after the anchor and the previous block, received
            anchor = SharedAnchor(1, None)
            anchor.kv[0] = random_kv(a)
            received = ReceivedKV(*random_kv(len(prev)))
            overlap = max(0, a - prev.start)  # block 1's previous is the anchor: less to attend than later blocks'
            return run_tokens(("previous", len(blk), a, len(prev), overlap), len(blk),
                              lambda c: EncodeWithPrevious(attn, c, [blk], anchor, a, prev, received))

        def context_row(n, p, b, name, star_context, blocks_of_anchor, landmarks):
            """One candidate's per-host times, the critical host's FLOPs and its KV bytes sent per layer."""
            a = b * blocks_of_anchor
            count, size = landmarks or (4, 64)
            mode = StarAttention(b, a, "shared", "uniform", star_context, count, size)
            layout = mode.layout(n, p)
            n_anchor = mode.anchor_tokens(layout)
            hosts, flops = {}, {}
            for h, blocks in enumerate(layout):
                t, f = 0.0, 0
                inside = [] if star_context == "anchor+previous" else [b for b in blocks if b.start < n_anchor]
                if inside:  # exactly, in one forward, after the anchor pieces of the hosts before
                    m, before = inside[-1].end - inside[0].start, inside[0].start
                    t += shared(m, before) if before else causal(m)
                    f += layer_flops(s, m, m * (m + 1) // 2 + m * before)
                for i, blk in enumerate(blocks[len(inside):]):
                    if blk.start == 0:
                        t, f = t + causal(len(blk)), f + layer_flops(s, len(blk), len(blk) * (len(blk) + 1) // 2)
                    elif star_context == "anchor+previous":
                        prev = blocks[i - 1] if i else layout[h - 1][-1]
                        seen = n_anchor + len(prev) - max(0, n_anchor - prev.start)
                        t += previous(blk, n_anchor, prev)
                        f += layer_flops(s, len(blk), len(blk) * (len(blk) + 1) // 2 + len(blk) * seen)
                    else:
                        _, pos, n_drop = star_block_tokens(torch.arange(n), blk, 0, mode.landmarks_of(blk))
                        t += shared(len(pos), n_anchor, n_drop)
                        f += layer_flops(s, len(pos), len(pos) * (len(pos) + 1) // 2 + len(pos) * n_anchor)
                hosts[f"host {h}"], flops[f"host {h}"] = t, f
            prev_bytes = max(len(bl[-1]) for bl in layout if bl) if star_context == "anchor+previous" else 0
            return (name, n_anchor, hosts, (n_anchor + prev_bytes) * kv_bytes_per_token, flops)

        for n in map(int, args.lengths.split(",")):
            for p in map(int, args.hosts.split(",")):
                b = n // p
                rows = []
                if n <= args.none_max:
                    rows.append(("none", 0, {"host 0": causal(n)}, 0, {"host 0": layer_flops(s, n, n * (n + 1) // 2)}))
                full = torch.randn(2, 1, s["num_kv_heads"], n, s["head_dim"], device=dev, dtype=model.dtype)
                local = sum(len(c) for c in ring_chunks(n, p)[0])
                t_ring = run_tokens(("ring", n, p), local, lambda c: RingHost(attn, c, n, p, 0, full[0], full[1]))
                full = None  # freed before the star runs (a closure above reads it: not del)
                ring_pairs = sum(len(x) for x in ring_chunks(n, p)[0]) * n // 2  # n(n+1)/2 shared evenly, about
                rows.append(("ring", 0, {"every host": t_ring}, (p - 1) * local * kv_bytes_per_token,
                             {"every host": layer_flops(s, local, ring_pairs)}))
                for mode in ("recompute", "shared"):
                    for div, part in ((1, "uniform"), (2, "uniform"), (4, "uniform"), (8, "uniform"), (1, "balanced")):
                        a = b // div
                        layout = star_layout(n, b, a, part, p)
                        hosts = {}
                        for h, blocks in enumerate(layout):
                            t = 0.0
                            for blk in blocks:
                                if blk.start == 0:
                                    t += causal(len(blk))
                                elif mode == "recompute":
                                    t += causal(a + len(blk))
                                else:
                                    t += shared(len(blk), a)
                            hosts[f"host {h}"] = t
                        comm = a * kv_bytes_per_token if mode == "shared" else 0
                        rows.append((f"star_{mode}_{part}", a, hosts, comm, None))
                if args.contexts:
                    rows += [context_row(n, p, b, *c) for c in CONTEXTS]
                for scheme, a, hosts, comm_bytes, flops in rows:
                    crit = float("nan") if any(v != v for v in hosts.values()) else max(hosts.values())
                    row = {"shape": shape, "context": n, "hosts": p, "block": b, "scheme": scheme, "anchor": a,
                           "per_layer_s": {k: round(v, 7) for k, v in hosts.items()},
                           "critical_per_layer_s": round(crit, 7), "layers": s["layers"],
                           "critical_model_s": round(crit * s["layers"], 5),
                           "comm_bytes_per_layer": comm_bytes,
                           **({"critical_host_tflops_per_layer": round(flops[max(hosts, key=hosts.get)] / 1e12, 4),
                               "tflops_per_layer": {k: round(v / 1e12, 4) for k, v in flops.items()}}
                              if flops else {}),
                           "comm_s_per_layer": {k: round(comm_bytes / (bw * 1e9), 7)
                                                for k, bw in BANDWIDTH_GBPS.items()}}
                    results["rows"].append(row)
                ring = next(r for r in results["rows"][-len(rows):] if r["scheme"] == "ring")
                for r in results["rows"][-len(rows):]:
                    r["speedup_vs_ring_compute"] = round(ring["critical_per_layer_s"] / r["critical_per_layer_s"], 3)
                    if r["critical_per_layer_s"] != r["critical_per_layer_s"]:
                        r["note"] = "out of memory on one GPU at TP=1"
                    print(f"{shape:13} N={n:>8} P={p:>2} {r['scheme']:26} a={r['anchor']:>7} "
                          f"{r['critical_per_layer_s'] * 1e3:9.3f} ms/layer  "
                          f"x{r['speedup_vs_ring_compute']:.2f} vs ring"
                          + (f"  {r['critical_host_tflops_per_layer']:.3f} TFLOP" if "tflops_per_layer" in r else ""),
                          flush=True)
        model = None  # freed before the next shape is built (closures above read it: not del)
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    benchlib.write_json(args.out, results)


if __name__ == "__main__":
    main()
