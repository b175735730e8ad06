"""Figures for docs/performance.md from the benchmark JSON under docs/bench/.

    python scripts/plot_bench.py docs/bench
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def phase1(bench: Path) -> None:
    rows = json.loads((bench / "phase1.json").read_text())["rows"]
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(len(shapes), 2, figsize=(12, 4.2 * len(shapes)), squeeze=False)
    for i, shape in enumerate(shapes):
        for j, p in enumerate((8, 32)):
            ax = axes[i][j]
            sel = [r for r in rows if r["shape"] == shape and r["hosts"] == p]
            lengths = sorted({r["context"] for r in sel})
            for scheme, div, style in (("star_shared_uniform", 1, "o-"), ("star_shared_uniform", 4, "o--"),
                                       ("star_recompute_uniform", 1, "s-"), ("star_recompute_uniform", 4, "s--"),
                                       ("none", 0, "x:")):
                xs, ys = [], []
                for n in lengths:
                    want = n // p // div if div else 0
                    r = next((r for r in sel if r["context"] == n and r["scheme"] == scheme and r["anchor"] == want),
                             None)
                    if r and r["critical_per_layer_s"] == r["critical_per_layer_s"]:
                        xs.append(n // 1024), ys.append(r["speedup_vs_ring_compute"])
                label = {"none": "none (one GPU)"}.get(
                    scheme, f"{scheme.replace('_uniform', '')} a=b" + (f"/{div}" if div > 1 else ""))
                ax.plot(xs, ys, style, label=label)
            ax.axhline(1.0, color="gray", lw=0.8)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log", base=2)
            ax.set_xlabel("context (K tokens)")
            ax.set_ylabel("speed-up over the ring host (phase 1)")
            ax.set_title(f"{shape}, {p} hosts, block = context / {p}")
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench / "phase1_speedup.png", dpi=110)


def kernels(bench: Path) -> None:
    d = json.loads((bench / "kernels.json").read_text())
    rows = [r for r in d["rows"] if "tflops" in r]
    fig, ax = plt.subplots(figsize=(7, 4))
    for name in sorted({r["backend"] for r in rows}):
        for kind, style in (("causal block", "-"), ("block x anchor", "--")):
            sel = sorted((r["block"], r["tflops"]) for r in rows if r["backend"] == name and r["kind"] == kind)
            if sel:
                ax.plot([b // 1024 for b, _ in sel], [t for _, t in sel], "o" + style, label=f"{name}, {kind}")
    if d.get("bf16_peak_tflops"):
        ax.axhline(d["bf16_peak_tflops"], color="k", lw=0.8, label="bf16 peak")
        ax.axhline(0.6 * d["bf16_peak_tflops"], color="gray", lw=0.8, ls=":", label="60% of peak")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("block (K tokens)")
    ax.set_ylabel("TFLOP/s")
    ax.set_title(f"attention kernels, bf16, 32 q / 8 kv heads, {d['hardware'].get('gpu', '')}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(bench / "kernels.png", dpi=110)


def decode(bench: Path) -> None:
    rows = json.loads((bench / "decode.json").read_text())["rows"]
    shapes = sorted({r["shape"] for r in rows})
    fig, axes = plt.subplots(1, len(shapes), figsize=(6 * len(shapes), 4), squeeze=False)
    for ax, shape in zip(axes[0], shapes):
        for p in sorted({r["hosts"] for r in rows}):
            sel = sorted((r["context"], r["step_per_layer_s"]) for r in rows if r["shape"] == shape and r["hosts"] == p)
            ax.plot([n // 1024 for n, _ in sel], [t * 1e3 for _, t in sel], "o-", label=f"{p} host(s)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (K tokens)")
        ax.set_ylabel("decode step, ms per layer")
        ax.set_title(f"{shape}: one token, local KV + merge")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench / "decode.png", dpi=110)


def decode_floor(bench: Path) -> None:
    """Phase 2 per token: the graph loop, the eager loop, HF compiled and the memory floor, per case."""
    path = bench / "decode_floor.json"
    if not path.exists():
        return
    rows = json.loads(path.read_text())["rows"]
    labels = [f"{r['shape'].replace('llama3.1-', '')} x{r['layers']}\nctx {r['context'] // 1024}K\n"
              f"KV {r['kv_share'] // 1024}K" for r in rows]
    series = [("floor", "floor_ms_per_token", "#999999"), ("graph (this)", "decode_ms_per_token", "#1f77b4"),
              ("HF static + compile", "hf_static_compiled_ms_per_token", "#2ca02c"),
              ("eager (before)", "eager_ms_per_token", "#d62728")]
    fig, ax = plt.subplots(figsize=(max(8, 1.6 * len(rows)), 4.6))
    width = 0.2
    for i, (name, key, color) in enumerate(series):
        xs = [j + (i - 1.5) * width for j, r in enumerate(rows) if r.get(key) is not None]
        ys = [r[key] for r in rows if r.get(key) is not None]
        ax.bar(xs, ys, width, label=name, color=color)
    ax.set_xticks(range(len(rows)), labels, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel("ms per generated token")
    ax.set_title("phase 2 decode on one GPU (bf16, random weights)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench / "decode_floor.png", dpi=110)


def load_memory(bench: Path) -> None:
    d = json.loads((bench / "load_memory.json").read_text())
    names = list(d["checkpoints"])
    fig, axes = plt.subplots(1, len(names), figsize=(7.5 * len(names), 4.6), squeeze=False,
                             gridspec_kw={"width_ratios": [len([r for r in d["rows"] if r["checkpoint"] == n])
                                                           for n in names]})
    mib = 2**20
    for ax, name in zip(axes[0], names):
        rows = [r for r in d["rows"] if r["checkpoint"] == name]
        info = d["checkpoints"][name]
        xs = range(len(rows))
        anon = [r["peak_over_baseline"]["RssAnon"] / mib for r in rows]
        file = [r["peak_over_baseline"]["RssFile"] / mib for r in rows]
        ax.bar([x - 0.2 for x in xs], anon, 0.4, label="peak anonymous RSS over baseline")
        ax.bar([x + 0.2 for x in xs], file, 0.4, label="peak file-backed RSS over baseline")
        for x, r in zip(xs, rows):
            ax.plot([x - 0.45, x + 0.45], [r["rank_weight_bytes"] / mib] * 2, "k-", lw=2,
                    label="this rank's weights (bf16)" if x == 0 else None)
        ax.axhline(info["file_bytes"] / mib, color="gray", ls="--", lw=1, label="whole checkpoint")
        method = {"star_mcore": "", "naive_load_file": "\nnaive\nload_file", "naive_read_bytes": "\nnaive\nread_bytes"}
        ax.set_xticks(list(xs), [(f"TP{r['tp']}" + (f"xCP{r['cp']}" if r["cp"] > 1 else "")) + f" r{r['rank']}"
                                 + method[r["method"]] for r in rows], fontsize=8)
        ax.set_ylim(0, 1.4 * max(anon + file + [info["file_bytes"] / mib]))
        ax.set_ylabel("MiB")
        ax.set_title(f"{name}: {info['params'] / 1e6:.1f}M params, {'/'.join(info['dtypes'])}, "
                     f"{len(info['files'])} file(s), {info['file_bytes'] / mib:.1f} MiB", fontsize=10)
        ax.legend(fontsize=7, loc="upper left", ncol=2)
    fig.suptitle("host memory per rank while load_hf_llama fills a bf16 StarLlama (CPU, gloo)", fontsize=11)
    fig.tight_layout()
    fig.savefig(bench / "load_memory.png", dpi=110)


def gpu_memory(bench: Path) -> None:
    d = json.loads((bench / "memory.json").read_text())
    rows, gib = d["rows"], 2**30
    xs = range(len(rows))
    fig, ax = plt.subplots(figsize=(11, 4.6))
    for off, key, label in ((-0.3, "measured_peak", "peak allocated (tensors)"),
                            (-0.1, "device_used", "device memory in use (allocator + context)"),
                            (0.1, None, "planner: weights + KV + activations"),
                            (0.3, "plan_total", "planner total (+ context, NCCL, slack)")):
        vals = [(r["plan_weights"] + r["plan_kv"] + r["plan_activations"] if key is None else r[key]) / gib
                for r in rows]
        ax.bar([x + off for x in xs], vals, 0.2, label=label)
    ax.set_xticks(list(xs), [f"{r['shape'].split('-')[-1]} x{r['layers']} layers\n{r['context'] // 1024}K {r['mode']}"
                             + (f"\nb={r['block'] // 1024}K a={r['anchor'] // 1024}K\n{r['anchor_mode']}"
                                if r["mode"] == "star" else "") for r in rows], fontsize=7)
    ax.set_ylabel("GiB")
    ax.legend(fontsize=8)
    ax.set_title(f"per-GPU memory of one request vs the planner ({d['hardware'].get('gpu', '')}, bf16, "
                 f"{d['alloc_conf'] or 'default allocator'})", fontsize=10)
    fig.tight_layout()
    fig.savefig(bench / "memory.png", dpi=110)


def batch(bench: Path) -> None:
    d = json.loads((bench / "batch.json").read_text())
    rows = [r for r in d["rows"] if not r["shared_context"] and "note" not in r]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    for i, share in enumerate(sorted({r["kv_share"] for r in rows})):
        sel = sorted((r for r in rows if r["kv_share"] == share), key=lambda r: r["batch"])
        b, c = [r["batch"] for r in sel], f"C{i}"
        axes[0].plot(b, [r["ms_per_step"] for r in sel], "o-", color=c, label=f"step, {share // 1024}K each")
        axes[0].plot(b, [r["floor_ms_per_step"] for r in sel], "x:", color=c, label=f"floor, {share // 1024}K each")
        axes[1].plot(b, [r["tokens_per_s"] for r in sel], "o-", color=c, label=f"{share // 1024}K each")
    axes[0].set(xlabel="requests decoding together", ylabel="ms per decode step", xscale="log", xticks=[1, 4, 16, 32],
                xticklabels=["1", "4", "16", "32"], title=f"{d['shape']}, {d['layers']} layers, one H200")
    axes[1].set(xlabel="requests decoding together", ylabel="generated tokens / s", xscale="log", xticks=[1, 4, 16, 32],
                xticklabels=["1", "4", "16", "32"], title="throughput")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(bench / "batch.png", dpi=110)


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/bench")
    phase1(out)
    kernels(out)
    decode(out)
    decode_floor(out)
    load_memory(out)
    gpu_memory(out)
    batch(out)
    print(f"wrote {out}/phase1_speedup.png, kernels.png, decode.png, decode_floor.png, load_memory.png, memory.png, "
          "batch.png")
