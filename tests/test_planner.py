"""The memory planner: its arithmetic against real tensors, the `plan` command, and refusal before loading."""

from __future__ import annotations

import json
from pathlib import Path

from safetensors import safe_open

from star_mcore.config import load_config
from star_mcore.inference.planner import kv_bytes_per_token, plan, weight_bytes
from star_mcore.model.arch import LlamaArch
from test_cli import CONFIG, star_mcore

BASE = ["inference.input_path=x", "inference.output_path=y"]


def test_weight_estimate_is_the_checkpoint_size(gqa_ckpt):
    arch = LlamaArch.from_hf_dir(gqa_ckpt)
    with safe_open(str(Path(gqa_ckpt) / "model.safetensors"), framework="pt") as f:
        total = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] for k in f.keys())
    assert weight_bytes(arch, 1, "fp32") == 4 * total
    assert weight_bytes(arch, 1, "bf16") == 2 * total
    # TP=2 splits everything but the norms; the vocabulary (101) is padded to 102
    assert weight_bytes(arch, 2, "fp32") < 0.55 * 4 * total


def test_kv_estimate_follows_the_layout(gqa_ckpt):
    arch = LlamaArch.from_hf_dir(gqa_ckpt)
    per = kv_bytes_per_token(arch, 1, "fp32")
    assert per == 2 * 2 * 2 * 16 * 4  # layers x (K, V) x KV heads x head dim x fp32
    cfg = load_config(CONFIG, BASE + [f"checkpoint.hf_path={gqa_ckpt}", "inference.block_size=100",
                                      "inference.anchor_size=100", "inference.tokens_to_generate=10"])
    p = plan(cfg, arch, context_len=1000, query_len=5)
    assert p.kv_cache == 300 * per  # 10 blocks over 4 hosts: 3, 3, 2, 2 (+15 on the last: 215 < 300)
    assert p.segment_tokens == 100  # shared anchor: each forward is one block
    assert plan(cfg, arch, context_len=800, query_len=5).kv_cache == (200 + 15) * per  # 2, 2, 2, 2: the query host
    cfg = load_config(CONFIG, BASE + [f"checkpoint.hf_path={gqa_ckpt}", "inference.block_size=100",
                                      "inference.anchor_size=100", "inference.anchor_mode=recompute"])
    assert plan(cfg, arch, 1000, 5).segment_tokens == 200  # recompute: anchor + block


def test_phase1_forward_of_each_star_context(gqa_ckpt):
    """The largest phase-1 forward (its activations) and the K, V held beside it, per star_context: 1000 tokens
    in 10 blocks of 100 on 4 hosts (3, 3, 2, 2 blocks)."""
    arch = LlamaArch.from_hf_dir(gqa_ckpt)
    per = kv_bytes_per_token(arch, 1, "fp32")

    def run(*overrides):
        cfg = load_config(CONFIG, BASE + [f"checkpoint.hf_path={gqa_ckpt}", "inference.block_size=100", *overrides])
        return plan(cfg, arch, 1000, 5)

    plain = run("inference.anchor_size=100")
    # long anchor, shared: host 0's blocks 0-2 all start inside the 250-token anchor, so it encodes them exactly
    # in one forward; recompute: blocks from 3 on re-encode the anchor
    long_shared = run("inference.anchor_size=250", "inference.star_context=long_anchor")
    assert long_shared.segment_tokens == 300
    assert long_shared.activations - plain.activations == (long_shared.segment_tokens - 100) * (
        plain.activations - 100 * per) // 100 + 150 * per  # the longer forward + 150 more anchor K, V kept
    assert run("inference.anchor_size=250", "inference.star_context=long_anchor",
               "inference.anchor_mode=recompute").segment_tokens == 250 + 100
    # landmarks: re-encoded in front of the block
    assert run("inference.anchor_size=100", "inference.star_context=anchor+landmarks", "inference.landmarks=2",
               "inference.landmark_size=10").segment_tokens == 120
    # previous block: a host's 3 blocks in one forward, and beside it one layer's anchor + 2 blocks of K, V
    prev = run("inference.anchor_size=100", "inference.star_context=anchor+previous")
    assert prev.segment_tokens == 300
    act_per_token = (plain.activations - 100 * per) // 100
    assert prev.activations == 300 * act_per_token + 100 * per + 300 * per // arch.num_layers


def test_plan_command_prints_the_estimate(gqa_ckpt):
    res = star_mcore("plan", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}", "trainer.device_memory_gib=1",
                     "--context-len", "400")
    assert res.returncode == 0, res.stderr
    assert "weights" in res.stdout and "KV cache (fullest host)" in res.stdout and res.stdout.strip().endswith("fits")
    res = star_mcore("plan", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}", "trainer.device_memory_gib=0.00001",
                     "--context-len", "400")
    assert res.returncode == 3 and "does NOT fit" in res.stdout


def test_a_run_that_cannot_fit_is_refused_before_loading(gqa_ckpt, tmp_path):
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"id": "a", "context_ids": list(range(90)) * 4, "query_ids": [1]}) + "\n")
    res = star_mcore("generate", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}", f"inference.input_path={req}",
                     f"inference.output_path={tmp_path / 'o.jsonl'}", "model.context_parallel_size=1",
                     "trainer.device_memory_gib=0.0001")
    assert res.returncode == 2
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("star-mcore: error: the run does not fit: about ")
    assert "for 360 context tokens" in lines[0]
    assert not (tmp_path / "o.jsonl").exists()


def test_the_kv_pool_counts_a_shared_context_once():
    from star_mcore.config import InferenceConfig
    from star_mcore.inference.modes import context_parallel_mode
    from star_mcore.inference.planner import pages_wanted, pool_pages

    star = context_parallel_mode(InferenceConfig(block_size=100, anchor_size=100))
    # 8 questions (own: 50 tokens = 2 pages of 32) over one 1000-token context on 4 hosts: shares 300/300/200/200
    questions = [("doc", 1000, 50)] * 8
    assert pages_wanted(star, 4, 32, 8, questions) == (7 + 8 * 2, 10)  # the query host; alone: host 0 (300)
    # 8 separate contexts: each counted; 2 slots take the two largest
    separate = [(f"doc{i}", 1000 + 100 * i, 50) for i in range(8)]
    wanted, alone = pages_wanted(star, 4, 32, 2, separate)
    shares = [star.context_shares(n, 4) for n in (1600, 1700)]
    assert wanted == max(sum(-(-s[h] // 32) for s in shares) + (4 if h == 3 else 0) for h in range(4))
    assert alone == max(max(-(-x // 32) for x in shares[1][:3]), -(-shares[1][3] // 32) + 2)
    # the pool: + the scratch page; a memory budget caps it, never below the largest request alone
    assert pool_pages(star, 4, 32, 8, questions) == 1 + 23
    assert pool_pages(star, 4, 32, 8, questions, budget=15) == 1 + 15
    assert pool_pages(star, 4, 32, 8, questions, budget=4) == 1 + 10
