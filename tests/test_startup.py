"""Start-up as a user sees it, on every supported megatron-core: the commands that need no model do not import
Megatron-core (they start in a second or two), and a run prints its own lines only, no import-time notices."""

from __future__ import annotations

import json
import subprocess
import sys

from distributed import free_port
from star_mcore.eval.settings import complete_setting
from test_cli import CONFIG, ROOT, _env

# Runs one command in-process, then records which top-level packages it imported.
PROBE = """
import json, sys
from star_mcore.cli.main import main
rc = main(sys.argv[2:])
json.dump({"rc": rc, "packages": sorted({m.split(".")[0] for m in sys.modules})}, open(sys.argv[1], "w"))
"""


def imported_by(tmp_path, *args):
    out = tmp_path / "probe.json"
    res = subprocess.run([sys.executable, "-c", PROBE, str(out), *args], capture_output=True, text=True, timeout=300,
                         env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    rec = json.loads(out.read_text())
    assert rec["rc"] == 0, res.stderr[-3000:]
    return set(rec["packages"]), res.stdout


def test_config_imports_neither_megatron_nor_torch(tmp_path):
    packages, stdout = imported_by(tmp_path, "config", "--config", CONFIG, "checkpoint.hf_path=/m")
    assert "hf_path: /m" in stdout
    assert "megatron" not in packages and "torch" not in packages


def test_plan_does_not_import_megatron(gqa_ckpt, tmp_path):
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "context_ids": list(range(90)), "query_ids": [1, 2]}) + "\n")
    packages, stdout = imported_by(tmp_path, "plan", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}",
                                   f"inference.input_path={requests}", "inference.output_path=o")
    assert "90 context + 2 query tokens" in stdout and "fits" in stdout  # the input's request was read
    assert "megatron" not in packages


def test_eval_report_does_not_import_megatron(tmp_path):
    results = tmp_path / "r.jsonl"
    setting = complete_setting({"context_parallel_mode": "star", "hosts": 2, "block_size": 64, "anchor_size": 64})
    results.write_text(json.dumps({"benchmark": "ruler", "task": "vt", "length": 256, "sample": 0, "score": 1.0,
                                   "setting": setting}) + "\n")
    packages, _ = imported_by(tmp_path, "eval-report", str(results), "--out", str(tmp_path / "report.md"))
    assert "| vt |" in (tmp_path / "report.md").read_text()
    assert "megatron" not in packages


def test_importing_the_model_prints_nothing_and_leaves_warnings_on():
    """mcore's notices (no Transformer Engine / Apex / absl) are dropped while it is imported, and only then:
    the same text warned afterwards is shown."""
    code = ("import warnings\nimport star_mcore.model.llama\n"
            "warnings.warn('Apex is not installed: warned after the import')\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=_env(),
                         cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["<string>:3: UserWarning: Apex is not installed: warned after the import"], res.stderr


def test_a_run_prints_only_its_own_lines(gqa_ckpt, tmp_path):
    """One rank, no launcher: building the model (GPTModel, its config) adds nothing to stderr either."""
    requests = tmp_path / "requests.jsonl"
    requests.write_text(json.dumps({"id": 1, "context_ids": list(range(40)), "query_ids": [1, 2]}) + "\n")
    res = subprocess.run([sys.executable, "-m", "star_mcore", "generate", "--config", CONFIG,
                          f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={requests}",
                          f"inference.output_path={tmp_path / 'out.jsonl'}", "inference.context_parallel_mode=none",
                          "model.context_parallel_size=1", "inference.tokens_to_generate=2"],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(_env(), MASTER_PORT=str(free_port())))
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines and all(line.startswith("[star-mcore] ") for line in lines), res.stderr
