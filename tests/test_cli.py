"""The user's contract: torchrun + `-m star_mcore generate --config ... key=value`, JSONL in and out,
per-request errors in the output, and one clear line for bad runs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from distributed import free_port
from hf_reference import global_generate

ROOT = Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "demo_cpu.yaml")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))


def torchrun(nproc, overrides, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "star_mcore", "generate", "--config", CONFIG, *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env(), cwd=ROOT)


def star_mcore(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "star_mcore", *args], capture_output=True, text=True,
                          timeout=timeout, env=_env(), cwd=ROOT)


@pytest.fixture(scope="module")
def requests_file(tmp_path_factory):
    g = torch.Generator().manual_seed(5)
    good = lambda n: torch.randint(0, 101, (n,), generator=g).tolist()  # noqa: E731
    lines = [
        json.dumps({"id": "a", "context_ids": good(45), "query_ids": good(4)}),
        "{not json",
        json.dumps({"id": "oov", "context_ids": [1, 2, 500], "query_ids": [3]}),
        json.dumps({"id": "empty", "context_ids": [], "query_ids": [3]}),
        json.dumps({"id": "long", "context_ids": good(510), "query_ids": [3]}),
        json.dumps({"id": "text", "context": "hello", "query": "world"}),
        json.dumps({"id": "b", "context_ids": good(30), "query_ids": good(2)}),
        b'{"id": "latin-1", "context": "caf\xe9", "query": "?"}',  # not UTF-8: an error line, not a traceback
        json.dumps({"id": "a", "context_ids": good(45), "query_ids": good(4)}),  # the id of line 1 again
    ]
    path = tmp_path_factory.mktemp("req") / "requests.jsonl"
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


def _run_mode(gqa_ckpt, requests_file, tmp_path, nproc, overrides):
    out = tmp_path / "out.jsonl"
    res = torchrun(nproc, [f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={requests_file}",
                           f"inference.output_path={out}", "inference.tokens_to_generate=5",
                           "inference.save_logits=true",
                           "inference.block_size=16", "inference.anchor_size=16", *overrides])
    assert res.returncode == 0, res.stderr[-3000:]
    return [json.loads(line) for line in out.read_text().splitlines()]


@pytest.fixture(scope="module")
def outputs(gqa_ckpt, requests_file, tmp_path_factory):
    runs = {
        "none": (1, ["inference.context_parallel_mode=none", "model.context_parallel_size=1"]),
        "ring": (4, ["inference.context_parallel_mode=ring", "model.context_parallel_size=2",
                     "model.tensor_model_parallel_size=2"]),
        "star": (4, ["inference.context_parallel_mode=star", "model.context_parallel_size=4"]),
    }
    return {name: _run_mode(gqa_ckpt, requests_file, tmp_path_factory.mktemp(name), n, o)
            for name, (n, o) in runs.items()}


@pytest.mark.parametrize("mode", ["none", "ring", "star"])
def test_every_request_gets_a_line_in_order(outputs, mode):
    recs = outputs[mode]
    assert [r["id"] for r in recs] == ["a", "line-2", "oov", "empty", "long", "text", "b", "line-8", "a"]
    errors = {r["id"]: r.get("error", "") for r in recs[:-1]}
    assert errors["line-8"] == "line 8 is not valid UTF-8 (byte 34: b'\\xe9')"
    assert recs[-1] == {"id": "a", "error": 'duplicate id "a": line 1 has the same id; give each request its own '
                                            "id (results are matched to requests by id)"}
    assert "line 2 is not valid JSON" in errors["line-2"]
    assert "token id 500 outside the vocabulary [0, 101)" in errors["oov"]
    assert errors["empty"] == "empty context"
    assert "exceeds the model's max positions (512)" in errors["long"]
    assert "has no tokenizer" in errors["text"]
    for r in (recs[0], recs[6]):
        assert "error" not in r and len(r["generated_ids"]) == 5
        assert len(r["first_step_logits"]) == 101
        assert r["phase1_s"] >= 0 and r["phase2_s"] > 0 and r["decode_tokens_per_s"] > 0


def test_ring_and_none_match_hf_through_the_cli(outputs, requests_file, gqa_ckpt):
    lines = requests_file.read_bytes().splitlines()[:7]
    reqs = {r.get("id"): r for r in map(json.loads, [x for x in lines if x.startswith(b'{"')])}
    for rid in ("a", "b"):
        tokens, logits = global_generate(gqa_ckpt, reqs[rid]["context_ids"], reqs[rid]["query_ids"], 5)
        for mode in ("none", "ring"):
            rec = next(r for r in outputs[mode] if r["id"] == rid)
            assert rec["generated_ids"] == tokens
            assert (torch.tensor(rec["first_step_logits"]) - logits).abs().max() <= 1e-4


@pytest.mark.parametrize("args,message", [
    (["inference.anchor_size=64", "inference.block_size=32"], "must be <= inference.block_size (32)"),
    (["inference.context_parallel_mode=galaxy"], "must be one of star, ring, none, got 'galaxy'"),
    (["checkpoint.hf_path=/nonexistent"], "checkpoint.hf_path=/nonexistent: not an HF checkpoint directory"),
    (["inference.input_path=/nonexistent.jsonl"], "inference.input_path=/nonexistent.jsonl: file not found"),
    (["model.context_parallel_size=4"], "world size 1 != tensor_model_parallel_size (1) x context_parallel_size (4)"),
    (["model.tensor_model_parallel_size=3", "model.context_parallel_size=1"], "world size 1 != "),
    (["inference.apply_chat_template=true", "model.context_parallel_size=1"], "has no chat template"),
    (["model.transformer_impl=transformer_engine"], "use model.transformer_impl=local with trainer.accelerator=cpu"),
])
def test_bad_runs_fail_with_one_clear_line(gqa_ckpt, requests_file, tmp_path, args, message):
    base = [f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={requests_file}",
            f"inference.output_path={tmp_path / 'o.jsonl'}"]
    res = star_mcore("generate", "--config", CONFIG, *base, *args)
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("star-mcore: error: "), res.stderr
    assert message in lines[0]


def test_a_kernel_that_cannot_run_here_is_refused_before_loading(gqa_ckpt, requests_file, tmp_path):
    """The backend is checked before any weight is read: here the weights are not even readable."""
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "config.json").write_text((Path(gqa_ckpt) / "config.json").read_text())
    (ckpt / "model.safetensors").write_bytes(b"not a safetensors file")
    res = star_mcore("generate", "--config", CONFIG, f"checkpoint.hf_path={ckpt}",
                     f"inference.input_path={requests_file}",
                     f"inference.output_path={tmp_path / 'o.jsonl'}", "model.context_parallel_size=1",
                     "inference.attention_backend=sdpa_cudnn")
    assert res.returncode == 2
    lines = [line for line in res.stderr.splitlines() if line.strip()]
    assert lines == ["star-mcore: error: inference.attention_backend=sdpa_cudnn: attention backend 'sdpa_cudnn' "
                     "needs a CUDA device"], res.stderr


def test_config_command_prints_the_resolved_config():
    res = star_mcore("config", "--config", CONFIG, "checkpoint.hf_path=/m", "inference.input_path=i",
                     "inference.output_path=o", "inference.context_parallel_mode=ring")
    assert res.returncode == 0
    assert "context_parallel_mode: ring" in res.stdout and "hf_path: /m" in res.stdout


def test_text_requests_use_the_checkpoint_tokenizer(text_ckpt, tmp_path):
    from transformers import AutoTokenizer

    from conftest import WORDS

    tok = AutoTokenizer.from_pretrained(text_ckpt, local_files_only=True)
    context = " ".join(WORDS[i % 16] for i in range(0, 90, 3))
    query = " kilo lima"
    ctx_ids = [tok.bos_token_id] + tok.encode(context, add_special_tokens=False)
    qry_ids = tok.encode(query, add_special_tokens=False)
    assert tok.decode(ctx_ids[1:]) == context  # round trip
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"id": "t", "context": context, "query": query}) + "\n"
                   + json.dumps({"id": "i", "context_ids": ctx_ids, "query_ids": qry_ids}) + "\n")
    out = tmp_path / "out.jsonl"
    res = torchrun(2, [f"checkpoint.hf_path={text_ckpt}", f"inference.input_path={req}", f"inference.output_path={out}",
                       "inference.context_parallel_mode=star", "model.context_parallel_size=2",
                       "inference.block_size=16", "inference.anchor_size=8", "inference.tokens_to_generate=6"])
    assert res.returncode == 0, res.stderr[-3000:]
    text_rec, ids_rec = [json.loads(line) for line in out.read_text().splitlines()]
    assert text_rec["generated_ids"] == ids_rec["generated_ids"]
    assert text_rec["text"] == tok.decode(text_rec["generated_ids"], skip_special_tokens=True)
    assert "text" not in ids_rec
    # the checkpoint's EOS (2) ends generation early when it is produced
    gen = text_rec["generated_ids"]
    assert len(gen) == 6 or gen[-1] == 2


@pytest.mark.parametrize("user_value", [None, "expandable_segments:False"])
def test_gpu_runs_get_expandable_segments_before_cuda_starts(gqa_ckpt, monkeypatch, user_value):
    """Set in preflight, before its first CUDA call (torch reads the variable when CUDA starts); a user's
    own setting is kept. On this CPU box preflight then stops at the missing GPU."""
    from star_mcore.config import load_config
    from star_mcore.errors import RunError
    from star_mcore.inference.runner import preflight

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    if user_value is None:
        monkeypatch.delenv("PYTORCH_CUDA_ALLOC_CONF", raising=False)
    else:
        monkeypatch.setenv("PYTORCH_CUDA_ALLOC_CONF", user_value)
    cfg = load_config(CONFIG, [f"checkpoint.hf_path={gqa_ckpt}", "model.context_parallel_size=1",
                               "trainer.accelerator=gpu", "inference.input_path=x", "inference.output_path=y"])
    with pytest.raises(RunError, match="no CUDA device is visible"):
        preflight(cfg)
    assert os.environ["PYTORCH_CUDA_ALLOC_CONF"] == (user_value or "expandable_segments:True")


def test_decode_without_cuda_graphs_is_said_once(gqa_ckpt, requests_file, tmp_path):
    """On CPU the graph loop runs the static step without a graph and says so in one line (not per request);
    the static and eager loops say nothing; all three answer the same tokens."""
    tokens = {}
    for decode, said in (("graph", 1), ("static", 0), ("eager", 0)):
        out = tmp_path / f"{decode}.jsonl"
        res = star_mcore("generate", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}",
                         "inference.context_parallel_mode=none", "model.context_parallel_size=1",
                         f"inference.input_path={requests_file}", f"inference.output_path={out}",
                         "inference.tokens_to_generate=5", f"inference.decode={decode}")
        assert res.returncode == 0, res.stderr[-3000:]
        lines = [line for line in res.stderr.splitlines() if line.startswith("[star-mcore] decode:")]
        assert len(lines) == said, res.stderr
        assert all("CUDA graphs need a CUDA device" in line for line in lines)
        tokens[decode] = {r["id"]: r["generated_ids"] for r in map(json.loads, out.read_text().splitlines())
                          if "generated_ids" in r}  # the answered ones (the file's last line repeats the id "a")
    assert len(tokens["eager"]["a"]) == 5 and len(tokens["eager"]["b"]) == 5
    assert tokens["graph"] == tokens["eager"] and tokens["static"] == tokens["eager"]
