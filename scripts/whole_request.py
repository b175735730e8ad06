"""A whole request at 128K tokens on 8 hosts (Llama-3.1-8B shape), from measured pieces: phase 1's critical path
(docs/bench/phase1_fa4.json: the slowest host's layer × 32), the query pass and the per-token decode cost of a
host holding its KV share (docs/bench/decode_floor.json), the phase-2 all-gather per layer and step (modelled:
NVLink latency per ring step + bytes / bandwidth, as bench_decode.py), and the decode graph's one-off capture.
Writes docs/bench/whole_request.json and prints the markdown table of docs/performance.md.

    python scripts/whole_request.py docs/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

HOSTS, CONTEXT, NEW, LAYERS = 8, 131072, 32, 32
LATENCY, BANDWIDTH = 10e-6, 450e9  # NVLink: s per all-gather step, bytes/s (bench_decode.py's model)
HQ, D = 32, 128


def main() -> None:
    bench = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    phase1 = [r for r in json.loads((bench / "phase1_fa4.json").read_text())["rows"]
              if r["shape"] == "llama3.1-8b" and r["context"] == CONTEXT and r["hosts"] == HOSTS]
    decode = {r["kv_share"]: r for r in json.loads((bench / "decode_floor.json").read_text())["rows"]
              if r["shape"] == "llama3.1-8b" and r["context"] == CONTEXT}
    gather = LAYERS * (LATENCY * (HOSTS - 1).bit_length() + HOSTS * HQ * (D + 1) * 4 / BANDWIDTH)
    schemes = [("none (1 GPU)", "none", 0, 1), ("ring", "ring", 0, HOSTS),
               ("star, anchor = block", "star_shared_uniform", CONTEXT // HOSTS, HOSTS),
               ("star, anchor = block/4", "star_shared_uniform", CONTEXT // HOSTS // 4, HOSTS)]
    rows = []
    for name, scheme, anchor, hosts in schemes:
        p1 = next(r for r in phase1 if r["scheme"] == scheme and r["anchor"] == anchor)["critical_model_s"]
        d = decode[CONTEXT // hosts]
        comm = gather if hosts > 1 else 0.0
        graph = d["loops"]["graph"]
        now = graph["first_token_s"] + graph["overhead_s"] + (NEW - 1) * (d["decode_ms_per_token"] / 1e3 + comm)
        before = d["loops"]["eager"]["first_token_s"] + (NEW - 1) * (d["eager_ms_per_token"] / 1e3 + comm)
        rows.append(dict(scheme=name, phase1_s=p1, first_token_s=graph["first_token_s"],
                         decode_graph_ms_per_token=d["decode_ms_per_token"] + comm * 1e3,
                         decode_eager_ms_per_token=d["eager_ms_per_token"] + comm * 1e3,
                         graph_overhead_s=graph["overhead_s"], phase2_s=now, phase2_eager_s=before,
                         total_s=p1 + now, total_eager_s=p1 + before))
    ring = next(r for r in rows if r["scheme"] == "ring")
    for r in rows:
        r["speedup_vs_ring"] = ring["total_s"] / r["total_s"]
        r["speedup_vs_ring_eager"] = ring["total_eager_s"] / r["total_eager_s"]
    out = dict(context=CONTEXT, hosts=HOSTS, new_tokens=NEW, layers=LAYERS, gather_model_s_per_step=gather, rows=rows)
    (bench / "whole_request.json").write_text(json.dumps(out, indent=1))
    print("| scheme | phase 1 | first token | decode ms/token (eager → graph) | phase 2, 32 tokens (eager → graph) "
          "| request (eager → graph) | × ring (eager → graph) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['scheme']} | {r['phase1_s']:.3f} s | {r['first_token_s'] * 1e3:.0f} ms | "
              f"{r['decode_eager_ms_per_token']:.1f} → {r['decode_graph_ms_per_token']:.1f} | "
              f"{r['phase2_eager_s']:.2f} → {r['phase2_s']:.2f} s | {r['total_eager_s']:.2f} → {r['total_s']:.2f} s | "
              f"{r['speedup_vs_ring_eager']:.2f} → {r['speedup_vs_ring']:.2f} |")


if __name__ == "__main__":
    main()
