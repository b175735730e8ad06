"""`star-mcore eval` end to end: torchrun, 2 star hosts, a tiny probe checkpoint; results appended per sample,
an interrupted run resumed without redoing or losing samples, and `eval-report` writing a table and a plot."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from star_mcore.eval.loop import read_done
from star_mcore.eval.settings import complete_setting
from star_mcore.inference.requests import ResultWriter
from test_cli import CONFIG, ROOT, _env, free_port, star_mcore

import subprocess
import sys


def eval_run(ckpt, out, *overrides, nproc=2):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "star_mcore", "eval", "ruler", "--config", CONFIG,
           f"checkpoint.hf_path={ckpt}", f"eval.output_path={out}", "model.context_parallel_size=2",
           "inference.context_parallel_mode=star", "inference.block_size=64", "inference.anchor_size=64",
           "eval.tasks=[niah_single_2,vt,qa_1]", "eval.lengths=[300,450]", "eval.samples=2",
           "eval.tokens_to_generate=4", *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def first_run(probe_tiny, tmp_path_factory):
    ckpt, _ = probe_tiny
    out = tmp_path_factory.mktemp("eval") / "results.jsonl"
    res = eval_run(ckpt, out)
    assert res.returncode == 0, res.stderr[-3000:]
    return ckpt, out, res


def test_every_sample_gets_a_scored_line(first_run):
    _, out, res = first_run
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    # lines are written as samples finish (they decode together): each sample once
    assert sorted((r["task"], r["length"], r["sample"]) for r in recs) == [
        (t, n, i) for t in ("niah_single_2", "vt") for n in (300, 450) for i in range(2)]
    for r in recs:
        assert r["benchmark"] == "ruler" and r["prompt_tokens"] <= r["length"]
        assert 0.0 <= r["score"] <= 1.0 and isinstance(r["prediction"], str) and r["references"]
        s = r["setting"]
        assert (s["context_parallel_mode"], s["hosts"], s["block_size"], s["anchor_size"]) == ("star", 2, 64, 64)
        assert r["context_tokens"] < r["prompt_tokens"] and r["blocks"] == -(-r["context_tokens"] // 64)
    vt = [r for r in recs if r["task"] == "vt"]
    assert all(r["metric"] == "string_match_all" and len(r["references"]) == 5 for r in vt)  # five variables
    notes = [line for line in res.stderr.splitlines() if "note: skipping" in line]
    assert len(notes) == 1 and "qa_1 (no eval.squad_path)" in notes[0]


def test_an_interrupted_run_resumes_without_redoing_or_losing_samples(first_run, tmp_path):
    ckpt, full, _ = first_run
    lines = full.read_text().splitlines(keepends=True)
    cut = tmp_path / "results.jsonl"
    cut.write_text("".join(lines[:5]) + lines[5][:40])  # killed while writing the sixth line
    res = eval_run(ckpt, cut)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "3 new samples (5 already in the file)" in res.stderr
    # the same samples, once each; generation is deterministic, so the redone ones match too
    timing = ("phase1_s", "phase2_s", "first_token_s", "decode_tokens_per_s")
    strip = lambda path: sorted(({k: v for k, v in json.loads(line).items() if k not in timing}  # noqa: E731
                                 for line in path.read_text().splitlines()),
                                key=lambda r: (r["task"], r["length"], r["sample"]))
    assert strip(cut) == strip(full)


def test_resume_reads_only_whole_lines_of_the_same_setting(tmp_path):
    path = tmp_path / "r.jsonl"
    setting = complete_setting({"context_parallel_mode": "star", "anchor_size": 64})
    w = ResultWriter(str(path))
    w.write({"task": "vt", "length": 300, "sample": 0, "setting": setting})
    w.write({"task": "vt", "length": 300, "sample": 1, "setting": {**setting, "anchor_size": 0}})
    w.close()
    with open(path, "a") as f:
        f.write('{"task": "vt", "length": 300, "sam')
    assert read_done(str(path), setting) == {("vt", 300, 0)}
    w = ResultWriter(str(path))  # cuts the partial line before appending
    w.write({"task": "vt", "length": 300, "sample": 2, "setting": setting})
    w.close()
    assert read_done(str(path), setting) == {("vt", 300, 0), ("vt", 300, 2)}
    assert all(json.loads(line) for line in path.read_text().splitlines())


def test_results_written_before_a_setting_key_existed_count_as_its_default(tmp_path):
    path = tmp_path / "r.jsonl"
    current = complete_setting({"context_parallel_mode": "star", "anchor_size": 64})
    old = {k: v for k, v in current.items() if k != "apply_chat_template"}  # a file from before the key
    path.write_text(json.dumps({"task": "vt", "length": 300, "sample": 0, "setting": old}) + "\n")
    assert read_done(str(path), current) == {("vt", 300, 0)}
    assert read_done(str(path), {**current, "apply_chat_template": True}) == set()


def test_eval_report_writes_a_table_and_a_plot(first_run, tmp_path):
    _, out, _ = first_run
    res = star_mcore("eval-report", str(out), "--out", str(tmp_path / "report.md"))
    assert res.returncode == 0, res.stderr
    md = (tmp_path / "report.md").read_text()
    # 2 hosts ran 64-token blocks: fewer at 300 tokens than at 450
    blocks = sorted({json.loads(line)["blocks"] for line in out.read_text().splitlines()})
    label = f"star {blocks[0]}-{blocks[-1]} blocks a=b"
    assert blocks[0] < blocks[-1] and f"| {label} | " in md and f"| task | {label} |" in md
    assert "| niah_single_2 |" in md and "### 450 tokens" in md
    png = (tmp_path / "report.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


def test_eval_report_compares_means_only_over_the_same_tasks(tmp_path):
    """A setting run on a subset of the tasks (the anchor curve on NIAH only) gets no mean next to the full ones;
    the shared tasks get their own table, and the anchor curve and its global-attention line use them too."""
    from star_mcore.eval.report import _anchor_curves, aggregate, load_records, markdown, summary, write_report

    path = tmp_path / "r.jsonl"
    scores = {("none", 0): {"niah_single_1": 1.0, "vt": 0.8}, ("star", 64): {"niah_single_1": 1.0, "vt": 0.4},
              ("star", 32): {"niah_single_1": 0.5}, ("star", 0): {"niah_single_1": 1.0, "vt": 0.6}}
    with open(path, "w") as f:
        for (mode, anchor), tasks in scores.items():
            setting = complete_setting({"context_parallel_mode": mode, "hosts": 4, "block_size": 64,
                                        "anchor_size": anchor})
            for task, score in tasks.items():
                f.write(json.dumps({"benchmark": "ruler", "task": task, "length": 256, "sample": 0,
                                    "score": score, "setting": setting}) + "\n")
    s = summary(*aggregate(load_records([str(path)])))["ruler"]  # 256 tokens in blocks of 64: 4 blocks
    assert s["overall"] == {("none", 256): 90.0, ("star 4 blocks a=b", 256): 70.0, ("star 4 blocks a=0", 256): 80.0}
    assert s["common"] == {256: ["niah_single_1"]} and s["shared"][("star 4 blocks a=b/2", 256)] == 50.0
    md = markdown({"ruler": s}, [str(path)])
    assert "| star 4 blocks a=b/2 | – |" in md and "| star 4 blocks a=b | 70.0 (78%) |" in md
    assert "### Mean over the 1 tasks every setting ran at 256 tokens" in md
    assert "| star 4 blocks a=b/2 | 50.0 (50%) |" in md
    assert "| *mean* | *90.0* | *70.0* | – | *80.0* |" in md
    assert "| *mean of the 1 shared tasks* | *100.0* | *100.0* | *50.0* | *100.0* |" in md
    curve = _anchor_curves(s)["star 4 blocks @ 256"]
    assert curve == dict(points=[(0.0, 100.0), (0.5, 50.0), (1.0, 100.0)], reference=100.0, tasks=1)
    md_path, png_path = write_report([str(path)], str(tmp_path / "report.md"))
    assert Path(png_path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_eval_report_pairs_each_setting_with_global_attention(tmp_path):
    """Star against none on the same samples: lower / same / higher counts, the mean difference and the exact
    sign test; samples only one side ran are left out."""
    from star_mcore.eval.report import aggregate, load_records, markdown, sign_test, summary

    path = tmp_path / "r.jsonl"
    runs = {("none", 0): [1.0, 1.0, 0.0, 0.5, 1.0], ("star", 64): [1.0, 0.0, 1.0, 0.25]}  # star lacks sample 4
    with open(path, "w") as f:
        for (mode, anchor), scores in runs.items():
            setting = complete_setting({"context_parallel_mode": mode, "hosts": 1, "block_size": 64,
                                        "anchor_size": anchor})
            for i, score in enumerate(scores):
                f.write(json.dumps({"benchmark": "ruler", "task": "vt", "length": 256, "sample": i, "score": score,
                                    "setting": setting}) + "\n")
    s = summary(*aggregate(load_records([str(path)])))["ruler"]
    assert s["paired"] == {("star 4 blocks a=b", 256): dict(samples=4, lower=2, same=1, higher=1, diff=-6.25, p=1.0)}
    assert "| star 4 blocks a=b | 256 | 4 | 2 | 1 | 1 | -6.2 | 1 |" in markdown({"ruler": s}, [str(path)])
    assert sign_test(0, 10) == 2 / 1024 and sign_test(3, 3) == 1.0 and sign_test(0, 0) == 1.0


@pytest.mark.parametrize("args,message", [
    (["eval", "ruler"], "eval.output_path is required for eval"),
    (["eval", "ruler", "eval.output_path=o.jsonl", "eval.tasks=[qa1]"], "eval.tasks: qa1 not in ruler"),
    (["eval", "babilong", "eval.output_path=o.jsonl", "eval.lengths=[0]"], "eval.lengths must be positive"),
    (["eval", "ruler", "eval.output_path=o.jsonl", "eval.tasks=[qa_2]", "eval.hotpotqa_path=/none.json"],
     "eval.hotpotqa_path=/none.json: file not found"),
    (["generate"], "inference.input_path is required for generate"),
])
def test_bad_eval_runs_fail_with_one_clear_line(probe_tiny, args, message, capsys):
    from star_mcore.cli.main import main

    ckpt, _ = probe_tiny
    n = 2 if args[0] == "eval" else 1  # refused before any process group exists: in-process is enough
    assert main([*args[:n], "--config", CONFIG, f"checkpoint.hf_path={ckpt}", *args[n:]]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("star-mcore: error: "), lines
    assert message in lines[0]


def test_star_labels_count_blocks_not_hosts(tmp_path):
    """4 blocks run on one device are ``star 4 blocks`` (not ``x1``): from the recorded count, or, for results
    written before it was, from the context (or prompt) tokens and the block size; ring keeps its hosts."""
    from star_mcore.eval.report import label_settings

    def rec(mode, hosts, block, length, **extra):
        setting = complete_setting({"context_parallel_mode": mode, "hosts": hosts, "block_size": block,
                                    "anchor_size": block})
        return {"task": "vt", "length": length, "sample": 0, "score": 1.0, "setting": setting, **extra}

    records = [rec("star", 1, 1024, 4096, prompt_tokens=4090),  # older result: no count, no context tokens
               rec("star", 1, 512, 4096, context_tokens=1500, blocks=3),
               rec("star", 4, 256, 1024, context_tokens=1000),
               rec("ring", 4, 256, 1024)]
    labels = sorted(label_settings(records)[0].values())  # the two 4-block runs, at different lengths, share one
    assert labels == ["ring x4", "star 3 blocks a=b", "star 4 blocks a=b", "star 4 blocks a=b"]


def test_eval_report_needs_neither_torch_nor_megatron(tmp_path):
    """Reading result files and writing the report imports no torch, Megatron-core or transformers (a machine
    without them can make the tables)."""
    path = tmp_path / "r.jsonl"
    setting = complete_setting({"context_parallel_mode": "star", "hosts": 1, "block_size": 64, "anchor_size": 64})
    path.write_text(json.dumps({"benchmark": "ruler", "task": "vt", "length": 256, "sample": 0, "score": 1.0,
                                "setting": setting}) + "\n")
    blocker = ("import sys\n"
               "class Block:\n"
               "    def find_spec(self, name, path=None, target=None):\n"
               "        if name.split('.')[0] in ('torch', 'megatron', 'transformers'):\n"
               "            raise ImportError('blocked: ' + name)\n"
               "sys.meta_path.insert(0, Block())\n"
               "from star_mcore.cli.main import main\n"
               "sys.exit(main(sys.argv[1:]))\n")
    res = subprocess.run([sys.executable, "-c", blocker, "eval-report", str(path), "--out", str(tmp_path / "r.md")],
                         capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-2000:]
    assert "| star 4 blocks a=b | 100.0 |" in (tmp_path / "r.md").read_text()


def test_eval_report_pools_seeds_and_names_the_star_context(tmp_path):
    """Runs that differ only in eval.seed are one setting, their samples paired with global attention's of the
    same seed; star settings that differ in star_context are told apart by it."""
    from star_mcore.eval.report import aggregate, load_records, summary

    path = tmp_path / "r.jsonl"
    # per seed: (none, plain star, star with the previous block) scores of samples 0 and 1
    scores = {0: ((1, 1), (0, 1), (1, 1)), 1: ((1, 0), (0, 0), (1, 1))}
    contexts = (("none", 0, "anchor"), ("star", 64, "anchor"), ("star", 64, "anchor+previous"))
    with open(path, "w") as f:
        for seed, per_setting in scores.items():
            for (mode, anchor, star_context), samples in zip(contexts, per_setting):
                setting = complete_setting({"context_parallel_mode": mode, "hosts": 1, "block_size": 64,
                                            "anchor_size": anchor, "star_context": star_context, "seed": seed})
                for i, score in enumerate(samples):
                    f.write(json.dumps({"benchmark": "ruler", "task": "niah_single_1", "length": 256, "sample": i,
                                        "score": score, "setting": setting}) + "\n")
    s = summary(*aggregate(load_records([str(path)])))["ruler"]
    plain, previous = "star 4 blocks a=b (star_context=anchor)", "star 4 blocks a=b (star_context=anchor+previous)"
    assert s["labels"] == ["none", plain, previous]
    assert s["overall"] == {("none", 256): 75.0, (plain, 256): 25.0, (previous, 256): 100.0}
    assert {k: (v["samples"], v["lower"], v["higher"]) for k, v in s["paired"].items()} == {
        (plain, 256): (4, 2, 0), (previous, 256): (4, 0, 1)}
