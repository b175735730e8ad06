"""The architecture of a Megatron checkpoint, from what its training run recorded: Megatron-LM's saved
arguments (the ``args`` namespace in the checkpoint's common state) or Megatron-Bridge's ``run_config.yaml``
(its ``model`` section). Both name the model's fields as megatron-core's ``TransformerConfig`` does, plus a few
of their own (Megatron-LM: ``swiglu``, ``untie_embeddings_and_output_weights``, ``use_rope_scaling``; Bridge:
``share_embeddings_and_output_weights``, ``rope_scaling``, ``activation_func`` as a ``_target_`` entry).

Every field that changes the forward pass is either read into :class:`LlamaArch` or checked against the one
value this project implements (:data:`IMPLEMENTED`); any other value is refused naming the field and its value.
A field the record lacks did not exist in the release that wrote it, so that release had no such feature.
Plain Python: no megatron-core, no torch.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Optional

from ..errors import RunError
from .arch import LlamaArch, Rules, is_off, refuse_unimplemented

# megatron-core applies Llama-3.x RoPE scaling with these constants; only the factor is configurable.
MCORE_LLAMA3_SCALING = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _is(value: Any) -> Callable[[Any], bool]:
    return lambda v: v == value


def _silu(v: Any) -> bool:
    # Bridge writes a function as {"_target_": "torch.nn.functional.silu", "_call_": false}
    target = v.get("_target_") if isinstance(v, Mapping) else v
    return target == "torch.nn.functional.silu"


# field -> (test of the implemented value, what is implemented), for the fields both records share
# (TransformerConfig's names): mcore's local GPT layer with RMSNorm, SwiGLU, no biases, plain causal attention.
IMPLEMENTED: Rules = {
    "normalization": (_is("RMSNorm"), "RMSNorm"),
    "layernorm_zero_centered_gamma": (is_off, "false"),
    "apply_residual_connection_post_layernorm": (is_off, "false"),
    "add_bias_linear": (is_off, "false (no biases)"),
    "add_qkv_bias": (is_off, "false (no biases)"),
    "qk_layernorm": (is_off, "false"),
    "qk_l2_norm": (is_off, "false"),
    "attention_output_gate": (is_off, "false"),
    "multi_latent_attention": (is_off, "false"),
    "experimental_attention_variant": (is_off, "none"),
    "linear_attention_freq": (is_off, "none"),
    "softmax_type": (_is("vanilla"), "vanilla"),
    "softmax_scale": (is_off, "none (1 / sqrt(kv_channels))"),
    "window_size": (is_off, "none (full causal attention)"),
    "window_attn_skip_freq": (is_off, "none"),
    "position_embedding_type": (_is("rope"), "rope"),
    "rotary_percent": (_is(1.0), "1.0"),
    "rotary_interleaved": (is_off, "false"),
    "no_rope_freq": (is_off, "none (RoPE in every layer)"),
    "glu_linear_offset": (is_off, "0"),
    "activation_func_clamp_value": (is_off, "none"),
    "is_hybrid_model": (is_off, "false"),
    "heterogeneous_block_specs": (is_off, "false"),
    "fp8_param": (is_off, "false (weights in fp32 / bf16 / fp16)"),
    "fp4_param": (is_off, "false (weights in fp32 / bf16 / fp16)"),
}
# Megatron-LM's own argument names (its args keep every argument of the run).
IMPLEMENTED_ARGS: Rules = {
    "swiglu": (_is(True), "true (SwiGLU)"),
    "squared_relu": (is_off, "false"),
    "quick_geglu": (is_off, "false"),
    "apply_layernorm_1p": (is_off, "false"),
    "num_experts": (is_off, "none (dense MLP)"),
    "rope_type": (lambda v: v in (None, "rope"), "rope"),
    "rotary_seq_len_interpolation_factor": (is_off, "none"),
    "hybrid_layer_pattern": (is_off, "none"),
    "hybrid_override_pattern": (is_off, "none"),
    "heterogeneous_layers_config_path": (is_off, "none"),
    "heterogeneous_layers_config_encoded_json": (is_off, "none"),
    "fp8_param_gather": (is_off, "false (weights in fp32 / bf16 / fp16)"),
}
# Bridge's model provider (a TransformerConfig subclass).
IMPLEMENTED_BRIDGE: Rules = {
    "gated_linear_unit": (_is(True), "true (SwiGLU)"),
    "activation_func": (_silu, "torch.nn.functional.silu"),
    "num_moe_experts": (is_off, "none (dense MLP)"),
    "seq_len_interpolation_factor": (is_off, "none"),
}
# Fields without which the record cannot say it is a Llama: a release that lacks them defaults otherwise.
REQUIRED = ("normalization", "position_embedding_type", "add_bias_linear")


def _need(fields: Mapping[str, Any], name: str, where: str) -> Any:
    if fields.get(name) is None:
        raise RunError(f"{where}: {name} is not recorded; star-mcore cannot tell the architecture without it")
    return fields[name]


def arch_from_megatron(fields: Mapping[str, Any], kind: str, where: str, vocab_rows: int,
                       eos_token_ids: Optional[list] = None) -> LlamaArch:
    """``fields``: Megatron-LM's args (``kind="args"``) or Bridge's ``model`` section (``kind="bridge"``), as a
    mapping; ``where`` names them in messages; ``vocab_rows``: the rows of the saved (padded) embedding."""
    rules = {**IMPLEMENTED, **(IMPLEMENTED_ARGS if kind == "args" else IMPLEMENTED_BRIDGE)}
    for name in REQUIRED + (("swiglu",) if kind == "args" else ("gated_linear_unit", "activation_func")):
        _need(fields, name, where)
    refuse_unimplemented(fields, rules, where)
    hidden = int(_need(fields, "hidden_size", where))
    heads = int(_need(fields, "num_attention_heads", where))
    if kind == "args":  # Megatron-LM uses num_query_groups only with --group-query-attention
        groups = fields.get("num_query_groups") if fields.get("group_query_attention") else None
        tied = not fields.get("untie_embeddings_and_output_weights", False)
        scaling = bool(fields.get("use_rope_scaling"))
        positions = fields.get("max_position_embeddings") or fields.get("seq_length")
        eps = fields.get("norm_epsilon", fields.get("layernorm_epsilon"))  # older Megatron-LM: --norm-epsilon
    else:
        groups = fields.get("num_query_groups")
        tied = bool(fields.get("share_embeddings_and_output_weights", True))
        scaling = bool(fields.get("rope_scaling"))
        positions = fields.get("seq_length")
        eps = fields.get("layernorm_epsilon")
    vocab = fields.get("vocab_size") or vocab_rows  # the tokenizer's size where recorded, else the padded rows
    if vocab > vocab_rows:
        raise RunError(f"{where}: vocab_size={vocab} exceeds the {vocab_rows} rows of the saved embedding")
    padded = fields.get("padded_vocab_size")
    if padded is not None and padded != vocab_rows:
        raise RunError(f"{where}: padded_vocab_size={padded}, but the saved embedding has {vocab_rows} rows")
    theta = float(fields.get("rotary_base") or 10000)
    factor = float(fields.get("rope_scaling_factor") or 8.0)
    if scaling and not (math.isfinite(factor) and factor > 0):
        raise RunError(f"{where}: rope_scaling_factor={factor} is not a positive number")
    return LlamaArch(
        vocab_size=int(vocab),
        hidden_size=hidden,
        intermediate_size=int(fields.get("ffn_hidden_size") or 4 * hidden),  # TransformerConfig's default
        num_layers=int(_need(fields, "num_layers", where)),
        num_heads=heads,
        num_kv_heads=int(groups or heads),
        head_dim=int(fields.get("kv_channels") or hidden // heads),
        rms_norm_eps=float(1e-5 if eps is None else eps),
        rope_theta=theta,
        max_position_embeddings=int(positions or 4096),
        tie_word_embeddings=tied,
        rope_scaling={"rope_type": "llama3", "factor": factor, **MCORE_LLAMA3_SCALING} if scaling else None,
        eos_token_ids=list(eos_token_ids or []),
    )
