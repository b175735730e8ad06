"""Real-checkpoint features on tiny generated models: every RoPE variant against transformers, sharded
checkpoints with an index, TP-sharded loading."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from distributed import run_world
from hf_reference import load_hf
from star_mcore.model.tiny import make_tiny_llama
from workers import battery, load_footprint, mapped_files_during_load

IDS = torch.randint(0, 101, (300,), generator=torch.Generator().manual_seed(2)).tolist()
ROPES = {
    "llama3": dict(rope_theta=500000.0, rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "large-theta": dict(rope_theta=3.5e9),  # Gradient-1048k-style
}


def _hf_logits(path):
    with torch.no_grad():
        return load_hf(path)(torch.tensor([IDS])).logits[0]


@pytest.mark.parametrize("variant", list(ROPES))
def test_rope_variants_match_transformers(tmp_path, variant):
    path = str(make_tiny_llama(tmp_path / variant, vocab_size=101, hidden_size=64, intermediate_size=96, num_layers=2,
                               num_heads=4, num_kv_heads=2, max_position_embeddings=1024, seed=4, **ROPES[variant]))
    ours = torch.tensor(run_world(1, battery, path, 1, 1, [], [], IDS)[0]["full_logits"])
    assert (ours - _hf_logits(path)).abs().max().item() <= 1e-4


def test_sharded_checkpoint_loads_tp_sharded(gqa_ckpt, tmp_path):
    """An index over two shard files, loaded at TP=2 (each rank reads only its slices), equals HF."""
    src = Path(gqa_ckpt)
    w = load_file(str(src / "model.safetensors"))
    names = sorted(w)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        fn = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: w[k] for k in part}, str(tmp_path / fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    for f in ("config.json", "generation_config.json"):
        (tmp_path / f).write_text((src / f).read_text())
    ranks = run_world(2, battery, str(tmp_path), 2, 1, [], [], IDS)
    ref = _hf_logits(gqa_ckpt)
    for r in ranks:  # both TP ranks hold the gathered, full-vocabulary logits
        assert (torch.tensor(r["full_logits"]) - ref).abs().max().item() <= 1e-4


def test_tp_ranks_read_only_their_slices_straight_into_the_parameters(gqa_ckpt):
    """At TP=2 the ranks ask the checkpoint for their slices only (together: every tensor once, plus the
    replicated norms once more) and copy them into the parameters in place, converting fp32 -> bf16 on the
    way: no op allocates tensor memory during the load (no concatenated QKV / [gate; up], no padded vocab
    copy, no converted copy)."""
    from safetensors import safe_open

    with safe_open(str(Path(gqa_ckpt) / "model.safetensors"), framework="pt") as f:
        numel = {k: math.prod(f.get_slice(k).get_shape()) for k in f.keys()}
    ranks = run_world(2, load_footprint, gqa_ckpt, 2)
    replicated = sum(n for k, n in numel.items() if "norm" in k)
    assert sum(n for r in ranks for _, n in r["requested"]) == sum(numel.values()) + replicated
    for r in ranks:
        assert r["allocating_ops"] == []


def test_each_checkpoint_file_is_unmapped_once_read(gqa_ckpt, tmp_path):
    """Over four shard files (embedding / layer 0 / layer 1 / final norm + head) the loader maps one file
    at a time: a file's mapping goes once its tensors have been read, not at the end of the load."""
    src = Path(gqa_ckpt)
    w = load_file(str(src / "model.safetensors"))
    parts = [[k for k in w if k.startswith("model.embed")], [k for k in w if ".layers.0." in k],
             [k for k in w if ".layers.1." in k], ["model.norm.weight", "lm_head.weight"]]
    assert sorted(sum(parts, [])) == sorted(w)
    weight_map = {}
    for i, part in enumerate(parts):
        fn = f"model-0000{i + 1}-of-00004.safetensors"
        save_file({k: w[k] for k in part}, str(tmp_path / fn), metadata={"format": "pt"})
        weight_map.update({k: fn for k in part})
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    seen = run_world(1, mapped_files_during_load, str(tmp_path))[0]
    assert max(seen["during"]) == 1 and seen["after"] == 0, seen


def test_te_layer_names_its_norms_as_mcore_maps_the_local_ones():
    """The loader fills TE's fused norms under the names mcore itself maps the local layer's norms to (the
    local spec's sharded_state_dict_keys_map, the installed release's)."""
    from star_mcore.mcore_compat import get_gpt_layer_local_spec
    from star_mcore.model.llama import LAYER_NORMS

    keys = get_gpt_layer_local_spec(normalization="RMSNorm").submodules.sharded_state_dict_keys_map
    local = LAYER_NORMS["local"]
    assert LAYER_NORMS["transformer_engine"] == tuple(keys[n.split(".")[0] + "."] + "weight" for n in local)


def test_te_layers_are_refused_in_one_line_where_te_does_not_import(monkeypatch):
    import sys

    from star_mcore.errors import RunError
    from star_mcore.model.core_attention import AttentionRuntime
    from star_mcore.model.llama import star_layer_spec

    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch", None)  # import fails, whatever is installed
    with pytest.raises(RunError, match=r"^model.transformer_impl=transformer_engine needs TransformerEngine 2.x "
                       r"\(transformer_engine.pytorch\), which does not import here: ") as e:
        star_layer_spec(AttentionRuntime(2), "transformer_engine")
    assert "\n" not in str(e.value)
    spec = star_layer_spec(AttentionRuntime(2), "local")  # the local layer needs nothing of TE
    assert spec.submodules.self_attention.submodules.core_attention.keywords["runtime"].num_layers == 2
