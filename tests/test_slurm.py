"""The launch scripts: scripts/launch.sh (torchrun, one node) and scripts/slurm/star-mcore.sbatch on a real
Slurm, a one-node cluster on loopback (Debian's slurmctld, slurmd and munge, started by
scripts/ci/slurm_cluster.sh), each running the CPU config and checked against star attention done by hand."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from distributed import free_port
from hf_reference import star_generate
from star_mcore.config import load_config, world_size_needed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo_cpu.yaml")
SBATCH = ROOT / "scripts" / "slurm" / "star-mcore.sbatch"
LAUNCH = ROOT / "scripts" / "launch.sh"
CLUSTER = ROOT / "scripts" / "ci" / "slurm_cluster.sh"
SLURM_BINARIES = ("munged", "slurmctld", "slurmd", "sbatch", "srun", "scontrol", "squeue", "sinfo", "scancel")
JOB_TIMEOUT_S = 300
TOKENS, BLOCK, ANCHOR = 4, 16, 8
REQUIRED = ["checkpoint.hf_path=/m", "inference.input_path=i"]
FAKE_JOB = {"SLURM_JOB_ID": "7", "SLURM_JOB_NAME": "fake", "SLURM_JOB_NUM_NODES": "1"}


def _env(**extra):
    return dict(os.environ, OMP_NUM_THREADS="1", STAR_MCORE_PYTHON=sys.executable, **extra)


@pytest.fixture(scope="module")
def requests(tmp_path_factory):
    """Two requests whose contexts span several 16-token blocks, so both star hosts hold KV."""
    g = torch.Generator().manual_seed(11)
    reqs = [{"id": f"r{i}", "context_ids": torch.randint(0, 101, (n,), generator=g).tolist(),
             "query_ids": torch.randint(0, 101, (3,), generator=g).tolist()} for i, n in enumerate((70, 45))]
    path = tmp_path_factory.mktemp("slurm-req") / "requests.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in reqs))
    return path, reqs


def _overrides(ckpt, requests_path, tp, cp):
    return [f"checkpoint.hf_path={ckpt}", f"inference.input_path={requests_path}",
            f"model.tensor_model_parallel_size={tp}", f"model.context_parallel_size={cp}",
            "inference.context_parallel_mode=star", f"inference.block_size={BLOCK}", f"inference.anchor_size={ANCHOR}",
            f"inference.tokens_to_generate={TOKENS}", "inference.save_logits=true"]


def _check_run_dir(run_dir: Path, ckpt, reqs, tp, cp):
    """The run directory holds the resolved config the ranks ran and results equal to star done by hand."""
    cfg = load_config(str(run_dir / "config.yaml"))
    assert (cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size) == (tp, cp)
    assert cfg.inference.output_path == str(run_dir / "results.jsonl")
    results = [json.loads(line) for line in (run_dir / "results.jsonl").read_text().splitlines()]
    assert [r["id"] for r in results] == [r["id"] for r in reqs]
    for req, res in zip(reqs, results):
        tokens, logits = star_generate(ckpt, req["context_ids"], req["query_ids"], TOKENS, BLOCK, ANCHOR)
        assert res["generated_ids"] == tokens
        assert (torch.tensor(res["first_step_logits"]) - logits).abs().max() <= 1e-4


def test_launch_sh_runs_the_config_with_torchrun(gqa_ckpt, requests, tmp_path):
    path, reqs = requests
    res = subprocess.run(["bash", str(LAUNCH), CONFIG, *_overrides(gqa_ckpt, path, 1, 2)], cwd=tmp_path,
                         env=_env(), capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert run_dir.name.startswith("launch-")
    log = (run_dir / "log").read_text()
    assert "launch.sh: 2 rank(s) (cpu)" in log and "done: 2 answered, 0 with errors" in log
    _check_run_dir(run_dir, gqa_ckpt, reqs, 1, 2)


@pytest.mark.parametrize("script,args,env,message", [
    (LAUNCH, [], {}, "launch.sh: error: usage: scripts/launch.sh CONFIG [key=value ...]"),
    (LAUNCH, ["nope.yaml"], {}, "launch.sh: error: config file not found: nope.yaml"),
    (LAUNCH, [CONFIG, "inference.blok_size=3"], {}, "star-mcore: error: invalid config: Key 'blok_size' not in"),
    (SBATCH, [CONFIG], {}, "star-mcore.sbatch: error: submit this script with sbatch"),
    (SBATCH, [], {"SLURM_JOB_ID": "7"},
     "star-mcore.sbatch: error: usage: sbatch scripts/slurm/star-mcore.sbatch CONFIG"),
    (SBATCH, ["nope.yaml"], {"SLURM_JOB_ID": "7"}, "star-mcore.sbatch: error: config file not found: nope.yaml"),
    # Checks made inside the job before anything is launched, here with the job's variables set by hand.
    (SBATCH, [CONFIG, "inference.blok_size=3", *REQUIRED], FAKE_JOB,
     "star-mcore: error: invalid config: Key 'blok_size'"),
    (SBATCH, [CONFIG, *REQUIRED], dict(FAKE_JOB, SLURM_JOB_NUM_NODES="3"),
     "star-mcore.sbatch: error: TP x CP = 4 ranks do not split evenly over 3 nodes"),
    (SBATCH, [str(ROOT / "configs" / "llama3.1-8b-instruct.yaml"), *REQUIRED], dict(FAKE_JOB, SLURM_GPUS_ON_NODE="4"),
     "star-mcore.sbatch: error: 8 ranks per node need 8 GPUs per node, the job has 4 (sbatch --gpus-per-node=8)"),
    (ROOT / "scripts" / "slurm" / "serve.sbatch", [CONFIG], FAKE_JOB,  # run outside the repository
     "star-mcore: error: serve.sbatch: no scripts/slurm/star-mcore.sbatch under . (submit from the repository root "
     "or set STAR_MCORE_DIR)"),
])
def test_bad_input_stops_with_one_line(tmp_path, script, args, env, message):
    base = {k: v for k, v in _env().items() if not k.startswith("SLURM_")}
    res = subprocess.run(["bash", str(script), *args], cwd=tmp_path, env=dict(base, **env), capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("script,config,nodes,gpus", [
    ("llama3.1-8b.sbatch", "llama3.1-8b-instruct.yaml", 1, 8),
    ("llama3.1-70b.sbatch", "llama3.1-70b-instruct.yaml", 4, 8),
])
def test_model_scripts_ask_for_the_gpus_their_config_needs(script, config, nodes, gpus):
    text = (ROOT / "scripts" / "slurm" / script).read_text()
    assert f"#SBATCH --nodes={nodes}\n" in text and f"#SBATCH --gpus-per-node={gpus}\n" in text
    assert f'"$repo/configs/{config}"' in text
    cfg = load_config(str(ROOT / "configs" / config), [*REQUIRED, "inference.output_path=o"])
    assert world_size_needed(cfg) == nodes * gpus
    assert gpus % cfg.model.tensor_model_parallel_size == 0  # a TP group stays inside a node
    inf = cfg.inference
    assert (cfg.trainer.accelerator, cfg.model.precision, inf.context_parallel_mode) == ("gpu", "bf16", "star")
    assert (inf.block_size, inf.anchor_size, inf.tokens_to_generate) == (32768, 32768, 64)


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    missing = [b for b in SLURM_BINARIES if shutil.which(b) is None]
    if missing:
        pytest.skip(f"Slurm is not installed (no {', '.join(missing)}); "
                    "apt-get install slurmctld slurmd slurm-client munge to run this test")
    if os.geteuid() != 0:
        pytest.skip("a throwaway Slurm cluster needs root (munged, slurmctld and slurmd run as root)")
    cluster = tmp_path_factory.mktemp("slurm") / "cluster"
    try:
        res = subprocess.run(["bash", str(CLUSTER), "start", str(cluster)], capture_output=True, text=True,
                             timeout=120)
        if res.returncode != 0:
            pytest.skip(f"the one-node Slurm cluster did not start:\n{res.stderr[-3000:]}")
        yield _env(SLURM_CONF=str(cluster / "slurm.conf"))
    finally:
        subprocess.run(["bash", str(CLUSTER), "stop", str(cluster)], timeout=120)


def _wait(job_id: str, env) -> tuple[str, str]:
    """Poll the job (sbatch --wait polls too slowly) until it ends; returns its state and exit code."""
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while time.monotonic() < deadline:
        out = subprocess.run(["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True,
                             timeout=30).stdout
        state = re.search(r"JobState=(\S+)", out)
        if state and state.group(1) not in ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING"):
            return state.group(1), re.search(r"ExitCode=(\S+)", out).group(1)
        time.sleep(1)
    return "STILL RUNNING", "-"


def test_generic_sbatch_runs_star_through_srun_and_torchrun(slurm, gqa_ckpt, requests, tmp_path):
    """TP 2 x CP 2 on one node: one srun task running torchrun for 4 gloo ranks, as on a GPU node."""
    path, reqs = requests
    (tmp_path / "runs").mkdir()
    # A free port rather than the script's job-id port: a concurrent test cluster also starts at job 1.
    env = dict(slurm, MASTER_PORT=str(free_port()))
    sub = subprocess.run(["sbatch", "--parsable", "--job-name=ci-star", "--time=5", str(SBATCH), CONFIG,
                          *_overrides(gqa_ckpt, path, 2, 2)],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    state, exit_code = _wait(job_id, slurm)
    log = tmp_path / "runs" / f"ci-star-{job_id}.log"
    text = log.read_text() if log.exists() else "(no log)"
    assert (state, exit_code) == ("COMPLETED", "0:0"), text[-5000:]
    run_dir = tmp_path / "runs" / f"ci-star-{job_id}"
    assert (run_dir / "log").resolve() == log.resolve()
    assert f"job {job_id}: 1 node(s) x 4 rank(s) (cpu), rendezvous localhost:{env['MASTER_PORT']}," in text
    assert "done: 2 answered, 0 with errors" in text
    _check_run_dir(run_dir, gqa_ckpt, reqs, 2, 2)


def test_serve_sbatch_serves_and_drains_on_scancel(slurm, gqa_ckpt, requests, tmp_path):
    """scripts/slurm/serve.sbatch at CP 2 (star), submitted from outside the repository (STAR_MCORE_DIR): the
    server answers a completion over token ids with star's tokens done by hand, and scancel (SIGTERM) stops it
    through its drain ("server stopped" in the job's log)."""
    import httpx

    path, reqs = requests
    (tmp_path / "runs").mkdir()
    port = free_port()
    env = dict(slurm, MASTER_PORT=str(free_port()), STAR_MCORE_DIR=str(ROOT))  # submitted from elsewhere
    over = [f"checkpoint.hf_path={gqa_ckpt}", "model.context_parallel_size=2", "inference.context_parallel_mode=star",
            f"inference.block_size={BLOCK}", f"inference.anchor_size={ANCHOR}", f"serve.port={port}"]
    sub = subprocess.run(["sbatch", "--parsable", "--job-name=ci-serve", "--time=5",
                          str(ROOT / "scripts" / "slurm" / "serve.sbatch"), CONFIG, *over],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    log = tmp_path / "runs" / f"ci-serve-{job_id}.log"
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + JOB_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            state = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], env=slurm, capture_output=True,
                                   text=True, timeout=30).stdout.strip()
            assert state in ("PENDING", "CONFIGURING", "RUNNING"), (state, log.read_text()[-3000:])
            time.sleep(1)
        r = reqs[0]
        model = httpx.get(url + "/v1/models", timeout=30).json()["data"][0]["id"]
        res = httpx.post(url + "/v1/completions", timeout=120, json={
            "model": model, "context": r["context_ids"], "prompt": r["query_ids"], "max_tokens": TOKENS,
            "temperature": 0})
        assert res.status_code == 200, res.text
        tokens, _ = star_generate(gqa_ckpt, r["context_ids"], r["query_ids"], TOKENS, BLOCK, ANCHOR)
        assert res.json()["choices"][0]["token_ids"] == tokens
    finally:
        subprocess.run(["scancel", job_id], env=slurm, timeout=30)
    state, _ = _wait(job_id, slurm)
    text = log.read_text() if log.exists() else "(no log)"
    assert state == "CANCELLED", text[-3000:]
    # torchrun prints its own traceback when Slurm's SIGTERM reaches it; none comes from star-mcore's code
    assert "server stopped" in text and not re.search(r'File ".*star_mcore/', text), text[-3000:]
