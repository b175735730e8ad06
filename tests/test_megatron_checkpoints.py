"""Megatron checkpoints (tests/checkpoints/, written by scripts/make_megatron_checkpoints.py with megatron-core's
own save path, 0.16.1 and 0.19.2): loaded at another TP than saved, they give the logits of the same weights
loaded from HF format by transformers, under none / ring / star; and what the loaders do not implement is
refused by name, for Megatron and HF checkpoints alike."""

from __future__ import annotations

import json
import shutil
import sys
from functools import lru_cache
from pathlib import Path

import pytest
import torch
import yaml

from distributed import run_world
from hf_reference import global_generate, load_hf, star_generate
from star_mcore.config import CheckpointConfig
from star_mcore.errors import RunError
from star_mcore.model.checkpoint import open_checkpoint
from workers import checkpoints_battery, preflight_error

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import make_megatron_checkpoints as fixtures  # noqa: E402

SAVED = ROOT / "tests" / "checkpoints"
# name -> (save directory, variant of the weights, TP it was saved at)
CHECKPOINTS = {
    "lm-0.16": (SAVED / "megatron-lm-mcore0.16.1", "megatron-lm", 2),
    "lm-0.19": (SAVED / "megatron-lm-mcore0.19.2", "megatron-lm", 2),
    "bridge-0.19": (SAVED / "bridge-mcore0.19.2", "bridge", 1),
}
TOL = 1e-4  # fp32
VOCAB = fixtures.TINY["vocab_size"]
g = torch.Generator().manual_seed(31)
CTX, QRY = torch.randint(0, VOCAB, (45,), generator=g).tolist(), torch.randint(0, VOCAB, (3,), generator=g).tolist()
N = 3
MODES = {"none": ("none", 8, 8), "ring": ("ring", 8, 8), "star-a4": ("star", 8, 4), "star-a0": ("star", 16, 0)}
# (TP, CP) -> the modes run there; every checkpoint loads at a TP it was not saved at in one of TP 1 / 2 / 4 (CP
# shards no weight: the CP 2 ranks of TP2 x CP2 load what CP 1 loads)
WORLDS = {(1, 1): ["none"], (2, 2): ["ring", "star-a4", "star-a0"], (4, 1): ["none"]}


@pytest.fixture(scope="session")
def references(tmp_path_factory):
    """The weights of each variant as an HF checkpoint (fp32 copies of the saved bf16 values)."""
    root = tmp_path_factory.mktemp("megatron-ref")
    return {v: str(fixtures.reference_hf(root / v, v)) for v in fixtures.VARIANTS}


_worlds = {}


def world(tp, cp):
    """Every checkpoint loaded in one (TP, CP) world, the world's modes run on each: once per session."""
    if (tp, cp) not in _worlds:
        cases = [dict(name=m, mode=MODES[m][0], block=MODES[m][1], anchor=MODES[m][2], ctx=CTX, qry=QRY, n=N)
                 for m in WORLDS[(tp, cp)]]
        ckpts = [{"name": k, "config": {"megatron_path": str(p)}} for k, (p, _, _) in CHECKPOINTS.items()]
        _worlds[(tp, cp)] = run_world(tp * cp, checkpoints_battery, ckpts, tp, cp, cases,
                                      CTX + QRY if tp * cp == 1 else None)
    return _worlds[(tp, cp)]


@lru_cache(maxsize=None)
def reference(path, mode):
    kind, block, anchor = MODES[mode]
    return star_generate(path, CTX, QRY, N, block, anchor) if kind == "star" else global_generate(path, CTX, QRY, N)


@pytest.mark.parametrize("name", list(CHECKPOINTS))
@pytest.mark.parametrize("tp,cp,mode", [(tp, cp, m) for (tp, cp), modes in WORLDS.items() for m in modes])
def test_logits_equal_the_same_weights_from_hf(references, name, tp, cp, mode):
    ranks = world(tp, cp)
    ref_tokens, ref_logits = reference(references[CHECKPOINTS[name][1]], mode)
    got = ranks[(cp - 1) * tp][name]["cases"][mode]  # the query host's first TP rank has the logits
    assert all(r[name]["cases"][mode]["tokens"] == got["tokens"] for r in ranks)
    logits = torch.tensor(got["logits"])
    assert (logits[:VOCAB] - ref_logits).abs().max().item() <= TOL
    assert (logits[VOCAB:] == 0).all()  # Megatron-LM's padding rows (zero here), never above a real token
    assert got["tokens"] == ref_tokens


def test_every_position_equals_transformers_at_tp1(references):
    """A whole causal forward pass at TP 1 (the Megatron-LM checkpoints were saved at TP 2)."""
    for name, (_, variant, _) in CHECKPOINTS.items():
        ours = torch.tensor(world(1, 1)[0][name]["full_logits"])[:, :VOCAB]
        with torch.no_grad():
            ref = load_hf(references[variant])(torch.tensor([CTX + QRY])).logits[0]
        assert (ours - ref).abs().max().item() <= TOL, name


def test_star_is_not_global_attention_here(references):
    """The star cases above are a real approximation (so their agreement with the by-hand star means it)."""
    ring = torch.tensor(world(2, 2)[0 + 2]["lm-0.16"]["cases"]["ring"]["logits"])
    star = torch.tensor(world(2, 2)[0 + 2]["lm-0.16"]["cases"]["star-a4"]["logits"])
    assert (ring - star).abs().max().item() > 1e-3


def test_tp_ranks_read_only_their_boxes():
    """At TP 2 the two ranks of a host ask the checkpoint, together, for every element the model uses once,
    plus the replicated norms once more (the Bridge vocabulary: its 101 rows of the 128 saved)."""
    from star_mcore.model.megatron_checkpoint import DcpCheckpoint

    for name, (path, _, _) in CHECKPOINTS.items():
        ckpt = open_checkpoint(CheckpointConfig(megatron_path=str(path)))
        a = ckpt.arch
        it = next(path.glob("iter_*"))
        sizes = {k: m.size for k, m in DcpCheckpoint(it).entries.items() if hasattr(m, "size")}
        vocab = sum(a.vocab_size * s[1] for k, s in sizes.items() if k in ("embedding.word_embeddings.weight",
                                                                               "output_layer.weight"))
        rest = sum(s.numel() for k, s in sizes.items() if k not in ("embedding.word_embeddings.weight",
                                                                     "output_layer.weight"))
        norms = (2 * a.num_layers + 1) * a.hidden_size
        assert sum(r[name]["requested"] for r in world(2, 2)[:2]) == vocab + rest + norms, name


def test_architecture_and_tokenizer_from_the_run_record():
    lm = open_checkpoint(CheckpointConfig(megatron_path=str(CHECKPOINTS["lm-0.19"][0])))
    a = lm.arch
    assert (a.num_kv_heads, a.head_dim, a.vocab_size, a.tie_word_embeddings) == (4, 8, 128, False)
    assert lm.arch.rope_scaling == fixtures.VARIANTS["megatron-lm"][0]["rope_scaling"]  # mcore's llama3 constants
    assert lm.arch.rope_theta == 500000.0
    bridge = open_checkpoint(CheckpointConfig(megatron_path=str(CHECKPOINTS["bridge-0.19"][0])))
    assert (bridge.arch.vocab_size, bridge.arch.tie_word_embeddings, bridge.arch.eos_token_ids) == (101, True, [2])
    assert bridge.tokenizer_dir == str(CHECKPOINTS["bridge-0.19"][0] / "iter_0000050" / "tokenizer")


# --- which iteration -------------------------------------------------------------------------------------------

def _refusal(**config) -> str:
    with pytest.raises(RunError) as e:
        ckpt = open_checkpoint(CheckpointConfig(**config))
        ckpt.check_files()
    assert "\n" not in str(e.value)
    return str(e.value)


def test_iteration_from_the_tracker_or_by_number(tmp_path):
    save = CHECKPOINTS["lm-0.16"][0]
    for config in ({"megatron_path": str(save)}, {"megatron_path": str(save), "iteration": 100},
                   {"megatron_path": str(save / "iter_0000100")}):
        assert open_checkpoint(CheckpointConfig(**config)).arch.num_layers == 2
    assert _refusal(megatron_path=str(save), iteration=7) == (
        f"checkpoint.megatron_path={save}: {save}/iter_0000007: no such checkpoint iteration (this save directory "
        "has: iter_0000100)")
    assert _refusal(megatron_path=str(save / "iter_0000100"), iteration=100).endswith(
        "is an iteration directory; checkpoint.iteration=100 applies to the save directory above it")
    assert _refusal(megatron_path=str(tmp_path)) == (
        f"checkpoint.megatron_path={tmp_path}: {tmp_path}: neither a torch_dist checkpoint (no metadata.json) nor "
        "a save directory (no latest_checkpointed_iteration.txt)")
    (tmp_path / "iter_0000001" / "mp_rank_00").mkdir(parents=True)
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("1\n")
    for path in (tmp_path, tmp_path / "iter_0000001"):
        assert _refusal(megatron_path=str(path)) == (
            f"checkpoint.megatron_path={path}: {tmp_path / 'iter_0000001'}: a legacy 'torch' checkpoint "
            "(mp_rank_*/model_optim_rng.pt); only ckpt_format torch_dist is read (Megatron-LM: --ckpt-format "
            "torch_dist, or convert it)")


# --- refusals: Megatron-LM's args, Bridge's run_config.yaml, HF's config.json ----------------------------------

def _copy(name, tmp_path) -> Path:
    dst = tmp_path / name
    shutil.copytree(CHECKPOINTS[name][0], dst)
    return dst


ARGS_REFUSED = [
    ("normalization", "LayerNorm"), ("add_qkv_bias", True), ("add_bias_linear", True), ("swiglu", False),
    ("squared_relu", True), ("num_experts", 8), ("window_size", (128, 0)), ("qk_layernorm", True),
    ("layernorm_zero_centered_gamma", True), ("apply_layernorm_1p", True), ("position_embedding_type", "yarn"),
    ("multi_latent_attention", True), ("rotary_percent", 0.5), ("rotary_interleaved", True),
    ("rotary_seq_len_interpolation_factor", 4), ("apply_residual_connection_post_layernorm", True),
    ("softmax_scale", 0.1), ("fp8_param_gather", True), ("hybrid_override_pattern", "M*M*"),
]


@pytest.mark.parametrize("field,value", ARGS_REFUSED, ids=[f for f, _ in ARGS_REFUSED])
def test_megatron_lm_args_that_are_not_implemented_are_refused_by_name(tmp_path, field, value):
    save = _copy("lm-0.16", tmp_path)
    common = save / "iter_0000100" / "common.pt"
    args = fixtures.megatron_lm_args(2)
    setattr(args, field, value)
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100}, common)
    assert _refusal(megatron_path=str(save)) == (
        f"{common}: the saved args: {field}={value!r} is not implemented (star-mcore runs Llama: {field} = "
        f"{_implemented(field)})")


def _implemented(field):
    from star_mcore.model.megatron_arch import IMPLEMENTED, IMPLEMENTED_ARGS, IMPLEMENTED_BRIDGE

    return {**IMPLEMENTED, **IMPLEMENTED_ARGS, **IMPLEMENTED_BRIDGE}[field][1]


BRIDGE_REFUSED = [
    ("gated_linear_unit", False, "False"), ("activation_func", {"_target_": "torch.nn.functional.gelu"},
                                            "'torch.nn.functional.gelu'"),
    ("normalization", "LayerNorm", "'LayerNorm'"), ("num_moe_experts", 64, "64"),
    ("position_embedding_type", "learned_absolute", "'learned_absolute'"), ("attention_output_gate", True, "True"),
]


@pytest.mark.parametrize("field,value,shown", BRIDGE_REFUSED, ids=[f for f, _, _ in BRIDGE_REFUSED])
def test_bridge_model_fields_that_are_not_implemented_are_refused_by_name(tmp_path, field, value, shown):
    save = _copy("bridge-0.19", tmp_path)
    run_config = save / "iter_0000050" / "run_config.yaml"
    cfg = yaml.safe_load(run_config.read_text())
    cfg["model"][field] = value
    run_config.write_text(yaml.safe_dump(cfg))
    assert _refusal(megatron_path=str(save)) == (
        f"{run_config} (model): {field}={shown} is not implemented (star-mcore runs Llama: {field} = "
        f"{_implemented(field)})")


def test_tied_and_untied_mismatches_are_refused(tmp_path):
    bridge = _copy("bridge-0.19", tmp_path)
    run_config = bridge / "iter_0000050" / "run_config.yaml"
    cfg = yaml.safe_load(run_config.read_text())
    cfg["model"]["share_embeddings_and_output_weights"] = False
    run_config.write_text(yaml.safe_dump(cfg))
    assert _refusal(megatron_path=str(bridge)) == (
        f"{bridge / 'iter_0000050'}: the run's config has an untied output layer, but the checkpoint holds no "
        "output_layer.weight")
    lm = _copy("lm-0.16", tmp_path)
    args = fixtures.megatron_lm_args(2)
    args.untie_embeddings_and_output_weights = False
    torch.save({"args": args, "checkpoint_version": 3.0, "iteration": 100}, lm / "iter_0000100" / "common.pt")
    assert _refusal(megatron_path=str(lm)) == (
        f"{lm / 'iter_0000100'}: the run's config ties the output layer to the embedding, but the checkpoint "
        "holds a separate output_layer.weight")


def test_a_weight_the_model_does_not_have_is_refused_by_name(tmp_path):
    """A QKV bias saved beside the weights (here with torch DCP's own saver, into a copy of the 0.16 checkpoint)."""
    import torch.distributed.checkpoint as dcp

    src = CHECKPOINTS["lm-0.16"][0] / "iter_0000100"
    md = dcp.FileSystemReader(str(src)).read_metadata().state_dict_metadata
    state = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in md.items() if hasattr(m, "size")}
    dcp.load(state, storage_reader=dcp.FileSystemReader(str(src)), no_dist=True)
    state["decoder.layers.self_attention.linear_qkv.bias"] = torch.zeros(2, 128)
    dst = tmp_path / "iter_0000100"
    dcp.save(state, storage_writer=dcp.FileSystemWriter(str(dst)), no_dist=True)
    for f in ("common.pt", "metadata.json"):
        shutil.copy(src / f, dst / f)
    assert _refusal(megatron_path=str(dst)) == (
        f"{dst}: checkpoint tensor decoder.layers.self_attention.linear_qkv.bias is not part of the Llama "
        "star-mcore runs (refused rather than ignored)")


def test_the_architecture_from_hf_config_only_where_the_checkpoint_has_none(tmp_path, references):
    lm = _copy("lm-0.16", tmp_path)
    hf_config = str(Path(references["megatron-lm"]) / "config.json")
    common = lm / "iter_0000100" / "common.pt"
    assert _refusal(megatron_path=str(lm), hf_config=hf_config) == (
        f"checkpoint.hf_config={hf_config}: the checkpoint records its own architecture ({common}: the saved "
        "args); leave checkpoint.hf_config empty")
    torch.save({"checkpoint_version": 3.0, "iteration": 100}, lm / "iter_0000100" / "common.pt")  # no args
    assert _refusal(megatron_path=str(lm)) == (
        f"checkpoint.megatron_path={lm}: {lm / 'iter_0000100'} records no architecture (no run_config.yaml, no "
        "saved args); set checkpoint.hf_config to the model's config.json")
    arch = open_checkpoint(CheckpointConfig(megatron_path=str(lm), hf_config=hf_config)).arch
    assert arch == open_checkpoint(CheckpointConfig(hf_path=references["megatron-lm"])).arch


HF_REFUSED = [("attention_bias", True), ("mlp_bias", True), ("hidden_act", "gelu"), ("sliding_window", 4096),
              ("quantization_config", {"quant_method": "fp8"})]


@pytest.mark.parametrize("field,value", HF_REFUSED, ids=[f for f, _ in HF_REFUSED])
def test_hf_config_fields_that_are_not_implemented_are_refused_by_name(gqa_ckpt, tmp_path, field, value):
    from star_mcore.model.arch import HF_IMPLEMENTED

    shutil.copytree(gqa_ckpt, tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), field: value}))
    assert _refusal(hf_path=str(tmp_path / "hf")) == (
        f"{config}: {field}={value!r} is not implemented (star-mcore runs Llama: {field} = {HF_IMPLEMENTED[field][1]})")


def test_hf_rope_types_and_a_missing_head_are_refused(gqa_ckpt, tmp_path):
    from safetensors.torch import load_file, save_file

    shutil.copytree(gqa_ckpt, tmp_path / "hf")
    config = tmp_path / "hf" / "config.json"
    cfg = json.loads(config.read_text())
    config.write_text(json.dumps({**cfg, "rope_scaling": {"rope_type": "yarn", "factor": 4.0}}))
    assert _refusal(hf_path=str(tmp_path / "hf")) == (
        f"{config}: rope_scaling rope_type='yarn' is not implemented (implemented: default, llama3)")
    config.write_text(json.dumps(cfg))
    w = load_file(str(tmp_path / "hf" / "model.safetensors"))
    del w["lm_head.weight"]
    save_file(w, str(tmp_path / "hf" / "model.safetensors"))
    assert _refusal(hf_path=str(tmp_path / "hf")) == (
        f"{tmp_path / 'hf'}: config.json says tie_word_embeddings=false, but no weight file holds lm_head.weight")


# --- weight files ---------------------------------------------------------------------------------------------

def test_missing_and_truncated_weight_files_are_named(gqa_ckpt, tmp_path):
    lm = _copy("lm-0.19", tmp_path)
    data = lm / "iter_0000100" / "__1_0.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size - 10)
    assert _refusal(megatron_path=str(lm)) == (
        f"{data}: truncated ({size - 10} bytes; the checkpoint's index needs {size})")
    data.unlink()
    assert _refusal(megatron_path=str(lm)) == f"{data}: missing (the checkpoint's index needs it)"
    shutil.copytree(gqa_ckpt, tmp_path / "hf")
    st = tmp_path / "hf" / "model.safetensors"
    size = st.stat().st_size
    with open(st, "r+b") as f:
        f.truncate(size - 1)
    assert _refusal(hf_path=str(tmp_path / "hf")) == f"{st}: truncated ({size - 1} bytes; its header describes {size})"


# --- the CLI, end to end --------------------------------------------------------------------------------------

def test_generate_on_a_bridge_checkpoint_with_its_tokenizer(references, tmp_path):
    """torchrun, ring over 2 ranks: an ids request equals transformers on the same weights, a text request goes
    through the checkpoint's own tokenizer/ (and stops at its EOS, read from tokenizer.json)."""
    from test_cli import torchrun

    req, out = tmp_path / "req.jsonl", tmp_path / "out.jsonl"
    req.write_text(json.dumps({"id": "ids", "context_ids": CTX, "query_ids": QRY}) + "\n"
                   + json.dumps({"id": "text", "context": "alpha bravo charlie delta", "query": " echo"}) + "\n")
    res = torchrun(2, [f"checkpoint.megatron_path={CHECKPOINTS['bridge-0.19'][0]}", f"inference.input_path={req}",
                       f"inference.output_path={out}", f"inference.tokens_to_generate={N}",
                       "inference.save_logits=true", "model.context_parallel_size=2",
                       "inference.context_parallel_mode=ring"])
    assert res.returncode == 0, res.stderr[-3000:]
    rec = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
    tokens, logits = global_generate(references["bridge"], CTX, QRY, N)
    assert rec["ids"]["generated_ids"] == tokens
    assert (torch.tensor(rec["ids"]["first_step_logits"]) - logits).abs().max().item() <= TOL
    assert "error" not in rec["text"] and isinstance(rec["text"]["text"], str)


def test_a_truncated_weight_file_is_named_by_every_rank_before_any_collective(tmp_path):
    """Each rank of a TP 2 x CP 2 job runs the runner's checks and stops with the same line, so no rank is left
    waiting for the others."""
    from test_cli import CONFIG

    lm = _copy("lm-0.16", tmp_path)
    data = lm / "iter_0000100" / "__0_1.distcp"
    size = data.stat().st_size
    with open(data, "r+b") as f:
        f.truncate(size // 2)
    overrides = [f"checkpoint.megatron_path={lm}", "model.tensor_model_parallel_size=2",
                 "model.context_parallel_size=2", "inference.context_parallel_mode=ring"]
    assert run_world(4, preflight_error, CONFIG, overrides) == [
        f"{data}: truncated ({size // 2} bytes; the checkpoint's index needs {size})"] * 4


def test_a_damaged_weight_file_stops_the_run_naming_it(tmp_path):
    """The right size but unreadable content is found while loading: one line naming the file, exit code 2
    (torchrun ends the job when the first rank leaves; a rank that does not read the file would exit naming
    the rank that did)."""
    from test_cli import torchrun

    lm = _copy("lm-0.19", tmp_path)
    data = lm / "iter_0000100" / "__1_0.distcp"
    data.write_bytes(b"\0" * data.stat().st_size)
    req = tmp_path / "req.jsonl"
    req.write_text(json.dumps({"id": "a", "context_ids": CTX, "query_ids": QRY}) + "\n")
    res = torchrun(2, [f"checkpoint.megatron_path={lm}", f"inference.input_path={req}",
                       f"inference.output_path={tmp_path / 'out.jsonl'}", "model.tensor_model_parallel_size=2",
                       "model.context_parallel_size=1"])
    assert res.returncode != 0 and "exitcode  : 2" in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("star-mcore: error:")]
    assert errors and set(errors) == {
        f"star-mcore: error: {data}: cannot be read (UnpicklingError: Weights only load failed)"}, res.stderr
