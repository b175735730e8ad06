"""A Megatron-core GPTModel for Llama whose core attention is :class:`StarCoreAttention`, on mcore's local layer
(torch RMSNorm and mcore's linears) or its TransformerEngine layer (TE's fused RMSNorm + linear)."""

from __future__ import annotations

import functools
import importlib
from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import RunError
from ..mcore_compat import (ModuleSpec, TransformerConfig, get_gpt_layer_local_spec,
                            get_gpt_layer_with_transformer_engine_spec, make_gpt_model, make_transformer_config)
from ..ops.rope import inv_frequencies, rope_cos_sin
from ..parallel.groups import ParallelGroups
from ..parallel.tensor_parallel import gather_vocab_shards
from .arch import LlamaArch, padded_vocab_size
from .core_attention import AttentionRuntime, AttentionStep, StarCoreAttention

Tensor = torch.Tensor
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Each layer's two RMSNorm weights, as mcore names them under ``decoder.layers.N.``: modules of their own in the
# local layer; in the TE layer, fused into the linear each norm feeds (mcore maps the one to the other in the
# local spec's ``sharded_state_dict_keys_map``).
LAYER_NORMS = {
    "local": ("input_layernorm.weight", "pre_mlp_layernorm.weight"),
    "transformer_engine": ("self_attention.linear_qkv.layer_norm_weight", "mlp.linear_fc1.layer_norm_weight"),
}


def _require_transformer_engine() -> None:
    try:
        importlib.import_module("transformer_engine.pytorch")
    except ImportError as e:
        reason = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RunError("model.transformer_impl=transformer_engine needs TransformerEngine 2.x "
                       f"(transformer_engine.pytorch), which does not import here: {reason}") from None


def star_layer_spec(runtime: AttentionRuntime, transformer_impl: str = "local") -> ModuleSpec:
    """mcore's Llama layer (RMSNorm, SwiGLU, no biases) with this project's core attention: the local layer, or
    the TE layer (``transformer_engine``: the norms fused into TE's LayerNormLinear before QKV and fc1; a
    one-line RunError where TE does not import). The RMSNorm comes from the config's ``normalization``."""
    if transformer_impl == "transformer_engine":
        _require_transformer_engine()
        spec = get_gpt_layer_with_transformer_engine_spec()
    else:
        spec = get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = functools.partial(StarCoreAttention, runtime=runtime)
    return spec


def transformer_config(arch: LlamaArch, tp: int, cp: int, dtype: torch.dtype, on_cpu: bool) -> TransformerConfig:
    return make_transformer_config(
        num_layers=arch.num_layers,
        hidden_size=arch.hidden_size,
        ffn_hidden_size=arch.intermediate_size,
        num_attention_heads=arch.num_heads,
        num_query_groups=arch.num_kv_heads,
        kv_channels=arch.head_dim,
        normalization="RMSNorm",
        layernorm_epsilon=arch.rms_norm_eps,
        gated_linear_unit=True,
        activation_func=F.silu,
        add_bias_linear=False,
        add_qkv_bias=False,
        hidden_dropout=0.0,
        attention_dropout=0.0,
        bias_activation_fusion=False,
        bias_dropout_fusion=False,
        masked_softmax_fusion=False,
        apply_rope_fusion=False,
        persist_layer_norm=False,
        gradient_accumulation_fusion=False,
        tensor_model_parallel_size=tp,
        context_parallel_size=cp,
        use_cpu_initialization=on_cpu,
        perform_initialization=False,  # weights come from the checkpoint
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=dtype == torch.bfloat16,
        fp16=dtype == torch.float16,
    )


class StarLlama:
    """GPTModel + the rotary frequencies + the attention runtime the engine drives.

    Forward passes go through the model's own embedding, decoder (which ends in the final norm) and
    output layer; the engine asks for logits only where it needs them.
    """

    def __init__(self, arch: LlamaArch, groups: ParallelGroups, precision: str,
                 transformer_impl: str = "local") -> None:
        tp = groups.tp.size()
        if arch.num_kv_heads % tp or arch.num_heads % tp:
            raise ValueError(f"tensor_model_parallel_size={tp} must divide the model's {arch.num_heads} "
                             f"attention heads and {arch.num_kv_heads} KV heads")
        self.arch = arch
        self.dtype = DTYPES[precision]
        self.device = groups.device
        self.tp = groups.tp
        self.runtime = AttentionRuntime(arch.num_layers)
        self.layer_norm_names = LAYER_NORMS[transformer_impl]
        layer_spec = star_layer_spec(self.runtime, transformer_impl)
        config = transformer_config(arch, tp, groups.cp_size, self.dtype, on_cpu=self.device.type == "cpu")
        self.gpt = make_gpt_model(
            config=config,
            transformer_layer_spec=layer_spec,
            vocab_size=padded_vocab_size(arch.vocab_size, tp),
            max_sequence_length=arch.max_position_embeddings,
            pre_process=True,
            post_process=True,
            parallel_output=True,  # vocab-sharded logits; gathered by parallel.gather_vocab_shards
            # Tied embeddings are one tensor: the output layer allocates no weight of its own (see ``logits``).
            share_embeddings_and_output_weights=arch.tie_word_embeddings,
            position_embedding_type="none",  # RoPE frequencies come from position ids, below
            pg_collection=groups.pg_collection,
        ).to(device=self.device, dtype=self.dtype).eval()  # mcore's torch RMSNorm is built in fp32: bf16 end to end
        self.inv_freq = inv_frequencies(arch.head_dim, arch.rope_theta, arch.rope_scaling).to(self.device)

    @contextmanager
    def attending(self, step: AttentionStep) -> Iterator[AttentionStep]:
        """Forward passes inside the block use ``step`` as every layer's core attention. The step (and the KV
        cache it holds) is detached on the way out, also on a failure: nothing of a request outlives it."""
        if self.runtime.step is not None:
            raise RuntimeError("the model is already attending with another step")
        self.runtime.step = step
        try:
            yield step
        finally:
            self.runtime.step = None

    def hidden(self, ids: Tensor, positions: Tensor) -> Tensor:
        """ids, positions [s] (positions need not be contiguous) -> final-normed hidden states [s, 1, h].

        The rotary angles of ``positions`` are computed once here and applied by the core attention of every
        layer (mcore's decoder gets none), so a layer rotates q and k in one fused kernel each."""
        ids, positions = ids.to(self.device), positions.to(self.device)
        x = self.gpt.embedding(input_ids=ids[None], position_ids=positions[None])
        self.runtime.rope = rope_cos_sin(positions, self.inv_freq)
        try:
            return self.gpt.decoder(hidden_states=x, attention_mask=None, rotary_pos_emb=None)
        finally:
            self.runtime.rope = None

    def logits(self, hidden: Tensor) -> Tensor:
        """hidden [s, 1, h] -> float32 logits [s, vocab] (padding rows dropped)."""
        weight = self.gpt.shared_embedding_or_output_weight() if self.arch.tie_word_embeddings else None
        out, _ = self.gpt.output_layer(hidden, weight=weight)
        return gather_vocab_shards(out[:, 0].float(), self.tp)[:, : self.arch.vocab_size]
