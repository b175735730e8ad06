"""``star-mcore eval-report``: eval results JSONL -> a markdown table (task x length x setting) and a PNG plot."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from pathlib import Path
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import UserError
from ..inference.requests import read_records
from .settings import complete_setting
from .tasks import TASKS

_MODE_KEYS = ("context_parallel_mode", "hosts", "block_size", "anchor_size")
_POOLED = ("seed",)  # settings that differ only in these are one setting: their samples are pooled
_STAR_ONLY = ("anchor_mode", "partition", "star_context", "landmarks", "landmark_size")  # not in other modes' labels


def star_blocks(record: Dict[str, Any]) -> int:
    """The star blocks phase 1 encoded a sample's context in: recorded by ``eval``; for results written before
    it was, counted from the block size and the context (or the prompt, or the length) tokens."""
    if "blocks" in record:
        return int(record["blocks"])
    s = record["setting"]
    n = record.get("context_tokens") or record.get("prompt_tokens") or record["length"]
    first = s["block_size"] + (s["anchor_size"] if s.get("partition") == "balanced" else 0)
    return 1 + max(0, -(-(n - first) // s["block_size"]))


def load_records(paths: Sequence[str]) -> List[Dict[str, Any]]:
    records = []
    for path in paths:
        if not Path(path).is_file():
            raise UserError(f"{path}: file not found")
        for rec in read_records(path):
            if {"task", "length", "sample", "score", "setting"} <= rec.keys():
                records.append({**rec, "setting": complete_setting(rec["setting"])})
    if not records:
        raise UserError(f"no eval results in {', '.join(paths)}")
    return records


def _anchor(anchor: int, block: int) -> str:
    if anchor == 0:
        return "0"
    if anchor == block:
        return "b"
    if anchor > block and anchor % block == 0:  # star_context=long_anchor
        return f"{anchor // block}b"
    return f"b/{block // anchor}" if block % anchor == 0 else f"{anchor}/{block}"


def label_settings(records: List[Dict[str, Any]]) -> Tuple[Dict[str, str], Dict[str, Tuple[str, float]]]:
    """setting (as sorted JSON) -> a short label: ``none``, ``ring x4`` (hosts), ``star 4 blocks a=b/4`` (the blocks
    phase 1 cut the context into, whatever hosts ran them, and the anchor relative to the block; ``2-4 blocks``
    where lengths differ), plus the block where two star settings would otherwise share a label at one length,
    plus any other setting key that differs between the runs (model, precision, seed, ...). Also: star label ->
    (its label without the anchor, anchor / block), the points of the anchor-size curve."""
    settings: Dict[str, Dict[str, Any]] = {}
    lengths: Dict[str, set] = defaultdict(set)
    n_blocks: Dict[str, set] = defaultdict(set)
    for r in records:
        key = json.dumps(r["setting"], sort_keys=True)
        settings[key] = r["setting"]
        lengths[key].add(r["length"])
        if r["setting"]["context_parallel_mode"] == "star":
            n_blocks[key].add(star_blocks(r))
    keys = sorted({k for s in settings.values() for k in s} - set(_MODE_KEYS) - set(_POOLED))
    varying = [k for k in keys if len({json.dumps(s.get(k)) for s in settings.values()}) > 1]

    def base(key: str, s: Dict[str, Any]) -> str:
        mode = s["context_parallel_mode"]
        if mode == "star":
            lo, hi = min(n_blocks[key]), max(n_blocks[key])
            count = f"{lo}" if lo == hi else f"{lo}-{hi}"
            text = f"star {count} block{'s' if hi > 1 else ''} a={_anchor(s['anchor_size'], s['block_size'])}"
        else:
            text = {"none": "none", "ring": f"ring x{s['hosts']}"}.get(mode, mode)
        extra = [f"{k}={os.path.basename(str(s.get(k))) if k == 'model' else s.get(k)}" for k in varying
                 if mode == "star" or k not in _STAR_ONLY]
        return text + (f" ({', '.join(extra)})" if extra else "")

    labels = {k: base(k, s) for k, s in settings.items()}
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
    """(benchmark, label, task, length) -> {(seed, sample): score} (a sample seen twice keeps its last score;
    the seeds of one setting pooled), and the star labels' anchor sizes."""
    labels, anchors = label_settings(records)
    cells: Dict[Tuple[str, str, str, int], Dict[int, float]] = defaultdict(dict)
    for r in records:
        lab = labels[json.dumps(r["setting"], sort_keys=True)]
        sample = (r["setting"].get("seed"), r["sample"])
        cells[(r.get("benchmark", "ruler"), lab, r["task"], r["length"])][sample] = float(r["score"])
    return cells, anchors


def _mean(xs) -> float:
    xs = list(xs)
    return 100.0 * sum(xs) / len(xs)


def summary(cells, anchors) -> Dict[str, Dict[str, Any]]:
    """Per benchmark: labels, lengths, tasks, per-cell means and the mean over tasks for each (label, length).

    ``overall`` holds the mean over all the tasks run at that length, only for settings that ran all of them (a
    mean over fewer tasks is not comparable with it). Where some setting ran a subset, ``shared`` holds every
    setting's mean over the tasks all settings at that length ran (``common``), so those can be compared too."""
    names = list(TASKS)
    out: Dict[str, Dict[str, Any]] = {}
    for bench in sorted({c[0] for c in cells}):
        mine = {k: v for k, v in cells.items() if k[0] == bench}
        labels = sorted({k[1] for k in mine}, key=lambda lab: _order(lab, anchors))
        lengths = sorted({k[3] for k in mine})
        tasks = sorted({k[2] for k in mine}, key=lambda t: (names.index(t) if t in names else len(names), t))
        score = {(lab, t, n): _mean(v.values()) for (_, lab, t, n), v in mine.items()}
        count = {(lab, t, n): len(v) for (_, lab, t, n), v in mine.items()}
        ran = {(lab, n): [t for t in tasks if (lab, t, n) in score] for lab in labels for n in lengths}
        ran = {k: v for k, v in ran.items() if v}
        overall, shared, common = {}, {}, {}
        for n in lengths:
            at_n = [lab for lab in labels if (lab, n) in ran]
            every = [t for t in tasks if any(t in ran[(lab, n)] for lab in at_n)]
            for lab in at_n:
                if ran[(lab, n)] == every:
                    overall[(lab, n)] = sum(score[(lab, t, n)] for t in every) / len(every)
            both = [t for t in every if all(t in ran[(lab, n)] for lab in at_n)]
            if len(both) < len(every) and both:
                common[n] = both
                for lab in at_n:
                    shared[(lab, n)] = sum(score[(lab, t, n)] for t in both) / len(both)
        reference = "none" if "none" in labels else next((lab for lab in labels if lab.startswith("ring")), None)
        out[bench] = dict(labels=labels, lengths=lengths, tasks=tasks, score=score, count=count, ran=ran,
                          overall=overall, shared=shared, common=common, reference=reference,
                          anchors={lab: anchors[lab] for lab in labels if lab in anchors},
                          paired=paired(mine, labels, lengths, reference))
    return out


def sign_test(lower: int, higher: int) -> float:
    """Two-sided exact sign test: the chance of a split at least this uneven between ``lower`` and ``higher``
    if either were equally likely (ties left out)."""
    n, k = lower + higher, min(lower, higher)
    if n == 0:
        return 1.0
    return min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n)


def paired(cells, labels: List[str], lengths: List[int], reference) -> Dict[Tuple[str, int], Dict[str, float]]:
    """(label, length) -> the samples it shares with the reference (same task, length and sample: the same
    prompt), how many scored lower / the same / higher, the mean difference in points and the sign test's p."""
    diffs: Dict[Tuple[str, int], List[float]] = defaultdict(list)
    for (bench, lab, t, n), samples in cells.items():
        ref = cells.get((bench, reference, t, n))
        if lab != reference and ref:
            diffs[(lab, n)] += [samples[i] - ref[i] for i in samples if i in ref]
    out = {}
    for key in ((lab, n) for lab in labels for n in lengths):  # the tables' order
        d = diffs.get(key)
        if d:
            lower, higher = sum(x < 0 for x in d), sum(x > 0 for x in d)
            out[key] = dict(samples=len(d), lower=lower, same=len(d) - lower - higher, higher=higher,
                            diff=100.0 * sum(d) / len(d), p=sign_test(lower, higher))
    return out


def _with_share(v, r) -> str:
    return "–" if v is None else f"{v:.1f} ({100 * v / r:.0f}%)" if r else f"{v:.1f}"


def markdown(summ: Dict[str, Dict[str, Any]], sources: Sequence[str]) -> str:
    lines = ["# Eval results", "",
             f"From {', '.join(f'`{s}`' for s in sources)}. Scores: RULER's string match in % (mean over samples); "
             "*mean* is over the tasks. In brackets, the share of global attention's score at the same length "
             "(`none`, or `ring` where `none` did not run). Star labels give the blocks phase 1 cut the context "
             "into (`4 blocks`, whatever hosts ran them) and the anchor relative to the block (`a=b`, `a=b/4`, "
             "`a=0`); ring labels give its hosts (`x4`).", ""]
    for bench, s in summ.items():
        labels, lengths, ref = s["labels"], s["lengths"], s["reference"]
        lines += [f"## {bench}", "", "### Mean over tasks", "",
                  "| setting | " + " | ".join(str(n) for n in lengths) + " |",
                  "|---|" + "---:|" * len(lengths)]
        for lab in labels:
            cells = [_with_share(s["overall"].get((lab, n)), s["overall"].get((ref, n)) if lab != ref else None)
                     for n in lengths]
            lines.append(f"| {lab} | " + " | ".join(cells) + " |")
        lines.append("")
        partial = [lab for lab in labels if any((lab, n) in s["ran"] and (lab, n) not in s["overall"]
                                                for n in lengths)]
        if partial:
            lines += [f"`–`: not run, or run on only some of the tasks ({', '.join(partial)}); see below for the "
                      "mean over the tasks every setting ran.", ""]
        for n, both in s["common"].items():
            lines += [f"### Mean over the {len(both)} tasks every setting ran at {n} tokens", "",
                      f"Tasks: {', '.join(both)}.", "", f"| setting | {n} |", "|---|---:|"]
            for lab in labels:
                if (lab, n) in s["shared"]:
                    r = s["shared"].get((ref, n)) if lab != ref else None
                    lines.append(f"| {lab} | {_with_share(s['shared'][(lab, n)], r)} |")
            lines.append("")
        if s["paired"]:
            lines += [f"### Paired with {ref}", "",
                      f"Each setting against `{ref}` on the samples both ran (the same prompts): how many scored "
                      "lower, the same or higher, the mean difference in points, and the two-sided sign test's p "
                      "(lower against higher, ties left out; small p: a difference unlikely to be chance).", "",
                      "| setting | tokens | samples | lower | same | higher | mean diff | p |",
                      "|---|---:|---:|---:|---:|---:|---:|---:|"]
            for (lab, n), d in s["paired"].items():
                lines.append(f"| {lab} | {n} | {d['samples']} | {d['lower']} | {d['same']} | {d['higher']} | "
                             f"{d['diff']:+.1f} | {d['p']:.2g} |")
            lines.append("")
        for n in lengths:
            present = [lab for lab in labels if (lab, n) in s["ran"]]
            lines += [f"### {n} tokens", "", "| task | " + " | ".join(present) + " |",
                      "|---|" + "---:|" * len(present)]
            for t in s["tasks"]:
                row = [f"{s['score'][(lab, t, n)]:.1f}" if (lab, t, n) in s["score"] else "–" for lab in present]
                lines.append(f"| {t} | " + " | ".join(row) + " |")
            counts = [s["count"][k] for k in s["count"] if k[2] == n and k[0] in present]
            mean_row = [f"*{s['overall'][(lab, n)]:.1f}*" if (lab, n) in s["overall"] else "–" for lab in present]
            lines.append("| *mean* | " + " | ".join(mean_row) + " |")
            if n in s["common"]:
                lines.append(f"| *mean of the {len(s['common'][n])} shared tasks* | " +
                             " | ".join(f"*{s['shared'][(lab, n)]:.1f}*" for lab in present) + " |")
            lines += ["", f"Samples per cell: {min(counts)}" +
                      (f"–{max(counts)}" if max(counts) != min(counts) else ""), ""]
    return "\n".join(lines)


def plot(summ: Dict[str, Dict[str, Any]], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = len(summ)
    fig, axes = plt.subplots(rows, 3, figsize=(18, 4.8 * rows), squeeze=False)
    for row, (bench, s) in enumerate(summ.items()):
        color = {lab: f"C{i % 10}" for i, lab in enumerate(s["labels"])}
        ax = axes[row][0]
        for lab in s["labels"]:
            xs = [n for n in s["lengths"] if (lab, n) in s["overall"]]
            if xs:
                ax.plot(xs, [s["overall"][(lab, n)] for n in xs], marker="o", label=lab, color=color[lab])
        ax.set_xscale("log", base=2)
        ax.set_xticks(s["lengths"], [str(n) for n in s["lengths"]])
        ax.set(title=f"{bench}: mean over tasks (settings that ran them all)", xlabel="prompt tokens",
               ylabel="score (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)

        ax = axes[row][1]
        n = max(s["lengths"])
        labs = [lab for lab in s["labels"] if (lab, n) in s["ran"]]
        width = 0.8 / max(1, len(labs))
        for j, lab in enumerate(labs):
            ys = [s["score"].get((lab, t, n), float("nan")) for t in s["tasks"]]  # not run: no bar
            ax.bar([i + j * width for i in range(len(s["tasks"]))], ys, width, label=lab, color=color[lab])
        ax.set_xticks([i + 0.4 - width / 2 for i in range(len(s["tasks"]))], s["tasks"], rotation=45, ha="right",
                      fontsize=8)
        ncol = max(1, min(4, len(labs)))
        legend_rows = -(-len(labs) // ncol) if len(labs) > 1 else 0
        ax.set(title=f"{bench}: by task at {n} tokens", ylabel="score (%)", ylim=(0, 103 + 9 * legend_rows))
        ax.set_yticks(range(0, 101, 20))
        ax.grid(alpha=0.3, axis="y")
        if legend_rows:  # above the 100% line, clear of the bars
            ax.legend(fontsize=7, ncol=ncol, loc="upper center")

        ax = axes[row][2]
        curves = _anchor_curves(s)
        fracs = sorted({p[0] for c in curves.values() for p in c["points"]})
        for i, (name, c) in enumerate(curves.items()):  # colours apart from the settings' in the other panels
            col = plt.cm.viridis(0.85 * i / max(1, len(curves) - 1))
            ax.plot([fracs.index(p[0]) for p in c["points"]], [p[1] for p in c["points"]], marker="s", color=col,
                    label=f"{name} tokens, {c['tasks']} tasks")
            if c["reference"] is not None:
                ax.axhline(c["reference"], ls=":", lw=1.2, color=col)
        ax.set_xticks(range(len(fracs)), [_fraction(f) for f in fracs])
        ax.set(title=f"{bench}: star by anchor size (dotted: global attention, same tasks)",
               xlabel="anchor size (b = block)", ylabel="score (%)", ylim=(-3, 103))
        ax.grid(alpha=0.3)
        if curves:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "needs star runs with two or more anchor sizes", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fraction(frac: float) -> str:
    if frac == 0:
        return "0"
    if frac == 1:
        return "b"
    return f"b/{round(1 / frac)}" if abs(1 / frac - round(1 / frac)) < 1e-9 else f"{frac:.3g}b"


def _anchor_curves(s: Dict[str, Any]) -> Dict[str, Dict[str, Any]]:
    """"star 4 blocks @ 8192" -> {points: [(anchor / block, mean score)], reference, tasks}, for star runs that differ
    only in the anchor: each point and the reference (global attention) are means over the same tasks, those
    that every point of the curve ran."""
    groups: Dict[str, List[str]] = defaultdict(list)
    for lab, (group, _) in s["anchors"].items():
        for n in s["lengths"]:
            if (lab, n) in s["ran"]:
                groups[(group, n)].append(lab)
    curves = {}
    for (group, n), labs in groups.items():
        if len(labs) < 2:
            continue
        tasks = [t for t in s["tasks"] if all((lab, t, n) in s["score"] for lab in labs)]
        if not tasks:
            continue
        mean = lambda lab: sum(s["score"][(lab, t, n)] for t in tasks) / len(tasks)  # noqa: E731
        ref = s["reference"]
        has_ref = ref is not None and all((ref, t, n) in s["score"] for t in tasks)
        curves[f"{group} @ {n}"] = dict(points=sorted((s["anchors"][lab][1], mean(lab)) for lab in labs),
                                        reference=mean(ref) if has_ref else None, tasks=len(tasks))
    return curves


def write_report(paths: Sequence[str], out: str) -> List[str]:
    records = load_records(paths)
    summ = summary(*aggregate(records))
    md = Path(out)
    md.parent.mkdir(parents=True, exist_ok=True)
    png = md.with_suffix(".png")
    plot(summ, str(png))
    md.write_text(markdown(summ, paths) + f"\n![plot]({png.name})\n")
    return [str(md), str(png)]
