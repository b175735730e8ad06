"""Write the tiny Megatron checkpoints of tests/checkpoints/ with the installed megatron-core's own save path.

    .venv/bin/python scripts/make_megatron_checkpoints.py tests/checkpoints megatron-lm          # mcore 0.16.1
    .venv-py312/bin/python scripts/make_megatron_checkpoints.py tests/checkpoints megatron-lm bridge  # 0.19.2

Each variant is a save directory named for it and the installed release, written by a spawned gloo world on
CPU (Bridge is a recent project: its checkpoint is made with the newest release only):

- ``megatron-lm-mcore<V>/``: what Megatron-LM's ``save_checkpoint`` writes with ``--ckpt-format torch_dist
  --no-save-optim --no-save-rng`` at TP 2: the state dict of ``generate_state_dict`` (``args``,
  ``checkpoint_version`` 3.0, ``iteration``, ``model`` = ``GPTModel.sharded_state_dict``) through
  ``dist_checkpointing.save`` into ``iter_0000100/``, then the tracker ``latest_checkpointed_iteration.txt``.
  The ``args`` namespace holds what Megatron-LM's parser keeps: every ``TransformerConfig`` field (their
  defaults, enums included) and its own model arguments, set as ``--swiglu --normalization RMSNorm
  --disable-bias-linear --position-embedding-type rope --group-query-attention --untie-embeddings-and-output-
  weights --use-rope-scaling --make-vocab-size-divisible-by 64`` would. Untied, Llama-3.1 RoPE scaling.
- ``bridge-mcore<V>/``: what Megatron-Bridge's ``save_checkpoint`` writes at TP 1: the DCP files (no ``args``),
  ``run_config.yaml`` (the ``model`` section as its provider dataclass serializes: TransformerConfig fields,
  functions as ``_target_`` entries), ``train_state.pt``, ``tokenizer/`` (a tiny BPE, ``save_pretrained``
  layout), and in the save directory ``latest_train_state.pt`` and the Megatron-LM tracker. Tied embeddings;
  its layers saved without mcore's local-spec key map, so the norms keep their local names
  (``input_layernorm.weight``), where the Megatron-LM one has the TE-spec names.

The weights are :func:`reference_hf`'s (a seeded random Llama, rounded to bf16, saved in bf16), loaded into
this project's model at the save TP from a copy with the vocabulary padded as Megatron pads it (101 -> 128,
zero rows). Two assumptions of megatron-core's saver about a CUDA device (``torch.cuda.synchronize`` before
copying tensors to the host, the device of one flag tensor all-reduced at the end) are pointed at the CPU
for the duration of the save; nothing else is changed.
"""

from __future__ import annotations

import argparse
import dataclasses
import enum
import json
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

TINY = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=8, num_kv_heads=4,
            head_dim=8, max_position_embeddings=512)
VARIANTS = {  # name -> (make_tiny_llama arguments, save TP, iteration)
    "megatron-lm": (dict(TINY, seed=21, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}), 2, 100),
    "bridge": (dict(TINY, seed=22, tie_word_embeddings=True), 1, 50),
}
PADDED_VOCAB = 128  # Megatron-LM pads to a multiple of make_vocab_size_divisible_by (64) x TP (2)
WORDS = "alpha bravo charlie delta echo foxtrot golf hotel india juliet kilo lima mike november oscar papa".split()


def reference_hf(path: str | Path, variant: str) -> Path:
    """The variant's weights as an HF checkpoint in fp32 (bf16-rounded values: exactly what is saved)."""
    import torch
    from safetensors.torch import load_file, save_file

    from star_mcore.model.tiny import make_tiny_llama

    path = make_tiny_llama(path, **VARIANTS[variant][0])
    w = load_file(str(path / "model.safetensors"))
    save_file({k: v.to(torch.bfloat16).float() for k, v in w.items()}, str(path / "model.safetensors"),
              metadata={"format": "pt"})
    return path


def _padded_copy(src: Path, dst: Path) -> None:
    """``src`` with the vocabulary padded to PADDED_VOCAB by zero rows, in bf16, as the training run holds it."""
    import torch
    from safetensors.torch import load_file, save_file

    dst.mkdir(parents=True)
    w = load_file(str(src / "model.safetensors"))
    for k in ("model.embed_tokens.weight", "lm_head.weight"):
        if k in w:
            w[k] = torch.cat([w[k], w[k].new_zeros(PADDED_VOCAB - w[k].shape[0], w[k].shape[1])])
    save_file({k: v.to(torch.bfloat16) for k, v in w.items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(dict(cfg, vocab_size=PADDED_VOCAB)))


def megatron_lm_args(tp: int):
    """The args namespace a Megatron-LM run with the flags in this module's docstring saves."""
    from star_mcore.mcore_compat import TransformerConfig
    import torch

    args = {}
    for f in dataclasses.fields(TransformerConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None or isinstance(default, (bool, int, float, str, enum.Enum)):
            args[f.name] = default
    a = VARIANTS["megatron-lm"][0]
    args.update(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], ffn_hidden_size=a["intermediate_size"],
        num_attention_heads=a["num_heads"], group_query_attention=True, num_query_groups=a["num_kv_heads"],
        kv_channels=a["head_dim"], max_position_embeddings=a["max_position_embeddings"], seq_length=256,
        normalization="RMSNorm", layernorm_epsilon=1e-5, swiglu=True, squared_relu=False, quick_geglu=False,
        add_bias_linear=False, add_qkv_bias=False, position_embedding_type="rope", rotary_base=500000,
        rotary_percent=1.0, rotary_interleaved=False, rotary_seq_len_interpolation_factor=None,
        use_rope_scaling=True, rope_scaling_factor=8.0, rope_type=None, no_rope_freq=None,
        untie_embeddings_and_output_weights=True, apply_layernorm_1p=False, num_experts=None,
        make_vocab_size_divisible_by=64, padded_vocab_size=PADDED_VOCAB, vocab_size=None,
        tokenizer_type="HuggingFaceTokenizer", tokenizer_model="/data/tokenizer", ckpt_format="torch_dist",
        tensor_model_parallel_size=tp, pipeline_model_parallel_size=1, context_parallel_size=1,
        transformer_impl="transformer_engine", bf16=True, fp16=False, params_dtype=torch.bfloat16,
        use_distributed_optimizer=True, no_save_optim=True, no_save_rng=True, save="/checkpoints",
        iteration=VARIANTS["megatron-lm"][2], train_iters=100, micro_batch_size=1, global_batch_size=8,
        heterogeneous_layers_config_path=None, heterogeneous_layers_config_encoded_json=None,
        hybrid_override_pattern=None, fp8_param_gather=False)
    return argparse.Namespace(**args)


def bridge_run_config(tp: int) -> dict:
    """run_config.yaml's content as Bridge's ConfigContainer.to_yaml writes it (the parts a model needs)."""
    from star_mcore.mcore_compat import TransformerConfig

    def plain(v):
        if isinstance(v, enum.Enum):  # Megatron-LM's _enum_representer
            return {"_target_": f"{type(v).__module__}.{type(v).__qualname__}", "_call_": True, "_args_": [v.value],
                    "_name_": v.name}
        return v

    a = VARIANTS["bridge"][0]
    model = {"_target_": "megatron.bridge.models.llama.llama_provider.LlamaModelProvider"}
    for f in dataclasses.fields(TransformerConfig):
        default = f.default if f.default is not dataclasses.MISSING else None
        if default is None or isinstance(default, (bool, int, float, str, enum.Enum)):
            model[f.name] = plain(default)
    model.update(
        num_layers=a["num_layers"], hidden_size=a["hidden_size"], ffn_hidden_size=a["intermediate_size"],
        num_attention_heads=a["num_heads"], num_query_groups=a["num_kv_heads"], kv_channels=a["head_dim"],
        normalization="RMSNorm", layernorm_epsilon=1e-5, gated_linear_unit=True, add_bias_linear=False,
        add_qkv_bias=False, hidden_dropout=0.0, tensor_model_parallel_size=tp, bf16=True,
        activation_func={"_target_": "torch.nn.functional.silu", "_call_": False},
        params_dtype={"_target_": "torch.bfloat16", "_call_": False},
        # GPTModelProvider's own fields
        share_embeddings_and_output_weights=True, make_vocab_size_divisible_by=128, position_embedding_type="rope",
        rotary_base=10000, rotary_percent=1.0, rope_scaling=False, rope_scaling_factor=1.0,
        seq_len_interpolation_factor=None, seq_length=a["max_position_embeddings"], vocab_size=a["vocab_size"],
        should_pad_vocab=False, num_moe_experts=None, qk_layernorm=False, fp8=None, mtp_enabled=False)
    return {
        "model": model,
        "checkpoint": {"_target_": "megatron.bridge.training.config.CheckpointConfig", "save": "/checkpoints",
                       "ckpt_format": "torch_dist", "save_tokenizer_assets": True},
        "tokenizer": {"_target_": "megatron.bridge.training.tokenizers.config.TokenizerConfig",
                      "tokenizer_type": "HuggingFaceTokenizer", "tokenizer_model": "/data/tokenizer"},
        "train": {"_target_": "megatron.bridge.training.config.TrainingConfig", "train_iters": 50},
    }


def save_rank(hf: str, out: str, tp: int, state: dict, local_names: bool = False) -> None:
    """One rank of a TP ``tp`` world: the HF checkpoint ``hf`` loaded into this project's model in bf16, saved
    by megatron-core's ``dist_checkpointing.save`` into ``out`` with ``state`` (the common entries) beside
    ``model``. ``local_names``: without mcore's local-spec key map (the norms keep their own names)."""
    import torch
    from megatron.core import dist_checkpointing

    from star_mcore.model.arch import LlamaArch
    from star_mcore.model.hf_checkpoint import load_hf_llama
    from star_mcore.model.llama import StarLlama
    from star_mcore.parallel.groups import destroy_parallel, init_process_group, initialize_parallel

    device = init_process_group("cpu", 600)
    groups = initialize_parallel(tp, 1, device, 600)
    model = StarLlama(LlamaArch.from_hf_dir(hf), groups, "bf16")
    load_hf_llama(model, hf, groups.tp_rank, tp)
    if local_names:
        for layer in model.gpt.decoder.layers:
            layer.submodules_config.sharded_state_dict_keys_map = {}
    metadata = {"dp_cp_group": groups.pg_collection.dp_cp, "singleton_local_shards": False,
                "chained_optim_avoid_prefix": True}
    state = {**state, "model": model.gpt.sharded_state_dict(metadata=metadata)}
    torch.cuda.synchronize = lambda *a, **k: None  # the CPU assumptions named in the module docstring
    torch.cuda.current_device = lambda: "cpu"
    dist_checkpointing.save(state, out, content_metadata={k: v for k, v in metadata.items() if k != "dp_cp_group"})
    torch.distributed.barrier()
    destroy_parallel()


def make(variant: str, root: Path) -> Path:
    import importlib.metadata

    import torch
    from distributed import run_world

    from star_mcore.model.tiny import train_tiny_tokenizer

    _, tp, it = VARIANTS[variant]
    save = root / f"{variant}-mcore{importlib.metadata.version('megatron-core')}"
    shutil.rmtree(save, ignore_errors=True)
    it_dir = save / f"iter_{it:07d}"
    it_dir.mkdir(parents=True)
    with tempfile.TemporaryDirectory() as tmp:
        ref = reference_hf(Path(tmp) / "hf", variant)
        _padded_copy(ref, Path(tmp) / "padded")
        state = {"checkpoint_version": 3.0, "iteration": it}
        if variant == "megatron-lm":
            state.update(args=megatron_lm_args(tp), num_floating_point_operations_so_far=0)
        run_world(tp, save_rank, str(Path(tmp) / "padded"), str(it_dir), tp, state, variant == "bridge")
    if variant == "bridge":
        import yaml

        (it_dir / "run_config.yaml").write_text(yaml.safe_dump(bridge_run_config(tp)))
        texts = [" ".join(WORDS[(i * 7 + j) % len(WORDS)] for j in range(12)) + f" {i}" for i in range(300)]
        train_tiny_tokenizer(it_dir / "tokenizer", texts, vocab_size=96)
        train_state = {"step": torch.tensor(it), "consumed_train_samples": torch.tensor(it * 8),
                       "floating_point_operations_so_far": torch.tensor(0.0)}
        torch.save(train_state, it_dir / "train_state.pt")
        torch.save(train_state, save / "latest_train_state.pt")
    (save / "latest_checkpointed_iteration.txt").write_text(str(it))
    return save


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("variants", nargs="+", choices=list(VARIANTS))
    args = p.parse_args()
    for variant in args.variants:
        save = make(variant, Path(args.out))
        size = sum(f.stat().st_size for f in save.rglob("*") if f.is_file())
        print(f"{save}: {size / 1024:.0f} KiB")


if __name__ == "__main__":
    main()
