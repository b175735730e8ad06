"""``star-mcore eval-report``: eval results JSONL -> a markdown table (task x length x setting) and a PNG plot."""

from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import UserError
from .settings import complete_setting
from .tasks import TASKS

_MODE_KEYS = ("context_parallel_mode", "hosts", "block_size", "anchor_size")


def load_records(paths: Sequence[str]) -> List[Dict[str, Any]]:
    records = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: file not found")
        with open(path, encoding="utf-8") as f:
            for line in f:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by an interrupted run
                if isinstance(rec, dict) and {"task", "length", "sample", "score", "setting"} <= rec.keys():
                    records.append({**rec, "setting": complete_setting(rec["setting"])})
    if not records:
        raise UserError(f"no eval results in {', '.join(paths)}")
    return records


def _anchor(anchor: int, block: int) -> str:
    if anchor == 0:
        return "0"
    if anchor == block:
        return "b"
    return f"b/{block // anchor}" if block % anchor == 0 else f"{anchor}/{block}"


def label_settings(records: List[Dict[str, Any]]) -> Tuple[Dict[str, str], Dict[str, Tuple[str, float]]]:
    """setting (as sorted JSON) -> a short label: ``none``, ``ring x4``, ``star x4 a=b/4`` (anchor relative to the
    block), plus the block where two star settings would otherwise share a label at one length, plus any other
    setting key that differs between the runs (model, precision, seed, ...). Also: star label -> (its label
    without the anchor, anchor / block), the points of the anchor-size curve."""
    settings: Dict[str, Dict[str, Any]] = {}
    lengths: Dict[str, set] = defaultdict(set)
    for r in records:
        key = json.dumps(r["setting"], sort_keys=True)
        settings[key] = r["setting"]
        lengths[key].add(r["length"])
    keys = sorted({k for s in settings.values() for k in s} - set(_MODE_KEYS))
    varying = [k for k in keys if len({json.dumps(s.get(k)) for s in settings.values()}) > 1]

    def base(s: Dict[str, Any]) -> str:
        mode = s["context_parallel_mode"]
        text = {"none": "none", "ring": f"ring x{s['hosts']}"}.get(mode) or \
            f"star x{s['hosts']} a={_anchor(s['anchor_size'], s['block_size'])}"
        extra = [f"{k}={os.path.basename(str(s.get(k))) if k == 'model' else s.get(k)}" for k in varying]
        return text + (f" ({', '.join(extra)})" if extra else "")

    labels = {k: base(s) for k, s in settings.items()}
    by_label: Dict[str, List[str]] = defaultdict(list)
    for k, lab in labels.items():
        if settings[k]["context_parallel_mode"] == "star":
            by_label[lab].append(k)
    for lab, ks in by_label.items():
        blocks = {settings[k]["block_size"] for k in ks}
        overlap = any(lengths[a] & lengths[b] for a in ks for b in ks if a < b and
                      settings[a]["block_size"] != settings[b]["block_size"])
        if len(blocks) > 1 and overlap:
            for k in ks:
                labels[k] = lab.replace(" a=", f" b={settings[k]['block_size']} a=", 1)
    anchors = {}
    for k, lab in labels.items():
        st = settings[k]
        if st["context_parallel_mode"] == "star":
            a = _anchor(st["anchor_size"], st["block_size"])
            anchors[lab] = (lab.replace(f" a={a}", ""), st["anchor_size"] / st["block_size"])
    return labels, anchors


def _order(label: str, anchors: Dict[str, Tuple[str, float]]) -> Tuple:
    """none, ring, then star by group and from the largest anchor down."""
    group, frac = anchors.get(label, (label, 0.0))
    return ({"none": 0, "ring": 1, "star": 2}.get(label.split()[0], 3), group, -frac, label)


def aggregate(records: List[Dict[str, Any]]):
    """(benchmark, label, task, length) -> {sample: score} (a sample seen twice keeps its last score), and the
    star labels' anchor sizes."""
    labels, anchors = label_settings(records)
    cells: Dict[Tuple[str, str, str, int], Dict[int, float]] = defaultdict(dict)
    for r in records:
        lab = labels[json.dumps(r["setting"], sort_keys=True)]
        cells[(r.get("benchmark", "ruler"), lab, r["task"], r["length"])][r["sample"]] = float(r["score"])
    return cells, anchors


def _mean(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs)


def summary(cells, anchors) -> Dict[str, Dict[str, Any]]:
    """Per benchmark: labels, lengths, tasks, per-cell means and the mean over tasks for each (label, length)."""
    names = list(TASKS)
    out: Dict[str, Dict[str, Any]] = {}
    for bench in sorted({c[0] for c in cells}):
        mine = {k: v for k, v in cells.items() if k[0] == bench}
        labels = sorted({k[1] for k in mine}, key=lambda lab: _order(lab, anchors))
        lengths = sorted({k[3] for k in mine})
        tasks = sorted({k[2] for k in mine}, key=lambda t: (names.index(t) if t in names else len(names), t))
        score = {(lab, t, n): _mean(v.values()) for (_, lab, t, n), v in mine.items()}
        count = {(lab, t, n): len(v) for (_, lab, t, n), v in mine.items()}
        overall = {}
        for lab in labels:
            for n in lengths:
                vals = [score[(lab, t, n)] for t in tasks if (lab, t, n) in score]
                if vals:
                    overall[(lab, n)] = sum(vals) / len(vals)
        reference = "none" if "none" in labels else next((lab for lab in labels if lab.startswith("ring")), None)
        out[bench] = dict(labels=labels, lengths=lengths, tasks=tasks, score=score, count=count, overall=overall,
                          reference=reference, anchors={lab: anchors[lab] for lab in labels if lab in anchors})
    return out


def markdown(summ: Dict[str, Dict[str, Any]], sources: Sequence[str]) -> str:
    lines = ["# Eval results", "",
             f"From {', '.join(f'`{s}`' for s in sources)}. Scores: RULER's string match in % (mean over samples); "
             "*mean* is over the tasks. In brackets, the share of global attention's score at the same length "
             "(`none`, or `ring` where `none` did not run). Star labels give hosts (`x4`) and the anchor relative "
             "to the block (`a=b`, `a=b/4`, `a=0`).", ""]
    for bench, s in summ.items():
        labels, lengths, ref = s["labels"], s["lengths"], s["reference"]
        lines += [f"## {bench}", "", "### Mean over tasks", "",
                  "| setting | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for lab in labels:
            cells = []
            for n in lengths:
                v = s["overall"].get((lab, n))
                r = s["overall"].get((ref, n)) if ref else None
                if v is None:
                    cells.append("–")
                elif r and lab != ref:
                    cells.append(f"{v:.1f} ({100 * v / r:.0f}%)")
                else:
                    cells.append(f"{v:.1f}")
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        for n in lengths:
            present = [lab for lab in labels if (lab, n) in s["overall"]]
            lines += [f"### {n} tokens", "", "| task | " + " | ".join(present) + " |",
                      "|---|" + "---:|" * len(present)]
            for t in s["tasks"]:
                row = [f"{s['score'][(lab, t, n)]:.1f}" if (lab, t, n) in s["score"] else "–" for lab in present]
                lines.append(f"| {t} | " + " | ".join(row) + " |")
            counts = [s["count"][k] for k in s["count"] if k[2] == n and k[0] in present]
            lines += ["| *mean* | " + " | ".join(f"*{s['overall'][(lab, n)]:.1f}*" for lab in present) + " |", "",
                      f"Samples per cell: {min(counts)}" + (f"–{max(counts)}" if max(counts) != min(counts) else ""),
                      ""]
    return "\n".join(lines)


def plot(summ: Dict[str, Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(summ)
    fig, axes = plt.subplots(rows, 3, figsize=(18, 4.8 * rows), squeeze=False)
    for row, (bench, s) in enumerate(summ.items()):
        ax = axes[row][0]
        for lab in s["labels"]:
            xs = [n for n in s["lengths"] if (lab, n) in s["overall"]]
            ax.plot(xs, [s["overall"][(lab, n)] for n in xs], marker="o", label=lab)
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["lengths"], [str(n) for n in s["lengths"]])
        ax.set(title=f"{bench}: mean over tasks", xlabel="prompt tokens", ylabel="score (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

        ax = axes[row][1]
        n = max(s["lengths"])
        labs = [lab for lab in s["labels"] if (lab, n) in s["overall"]]
        width = 0.8 / max(1, len(labs))
        for j, lab in enumerate(labs):
            ys = [s["score"].get((lab, t, n), 0.0) for t in s["tasks"]]
            ax.bar([i + j * width for i in range(len(s["tasks"]))], ys, width, label=lab)
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(s["tasks"]))], s["tasks"], rotation=45, ha="right",
                      fontsize=8)
        ax.set(title=f"{bench}: by task at {n} tokens", ylabel="score (%)", ylim=(0, 103))
        ax.grid(alpha=0.3, axis="y")

        ax = axes[row][2]
        curves = _anchor_curves(s)
        for name, pts in curves.items():
            (line,) = ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{name} tokens")
            n = int(name.rsplit(" ", 1)[1])
            if (s["reference"], n) in s["overall"]:
                ax.axhline(s["overall"][(s["reference"], n)], ls=":", lw=1.2, color=line.get_color())
        ax.set(title=f"{bench}: star by anchor size (dotted: global attention)", xlabel="anchor / block",
               ylabel="score (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "needs star runs with two or more anchor sizes", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _anchor_curves(s: Dict[str, Any]) -> Dict[str, List[Tuple[float, float]]]:
    """"star x4 @ 8192" -> [(anchor / block, mean score)], for star runs that differ only in the anchor."""
    groups: Dict[str, List[Tuple[float, float]]] = defaultdict(list)
    for lab, (group, frac) in s["anchors"].items():
        for n in s["lengths"]:
            if (lab, n) in s["overall"]:
                groups[f"{group} @ {n}"].append((frac, s["overall"][(lab, n)]))
    return {g: sorted(pts) for g, pts in groups.items() if len(pts) >= 2}


def write_report(paths: Sequence[str], out: str) -> List[str]:
    records = load_records(paths)
    summ = summary(*aggregate(records))
    md = Path(out)
    md.parent.mkdir(parents=True, exist_ok=True)
    png = md.with_suffix(".png")
    plot(summ, str(png))
    md.write_text(markdown(summ, paths) + f"\n![plot]({png.name})\n")
    return [str(md), str(png)]
