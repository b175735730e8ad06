"""The architecture of a Llama checkpoint (:class:`LlamaArch`), and reading it from an HF config.json.

Every config.json field that changes the forward pass is either read or checked against what this project
implements (:data:`HF_IMPLEMENTED`); any other value is refused naming the field and its value."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

from ..errors import RunError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "llama3")


Rules = Mapping[str, Tuple[Callable[[Any], bool], str]]  # field -> (test of the implemented value, what that is)


def is_off(v: Any) -> bool:
    return v is None or v is False or v == 0


def refuse_unimplemented(fields: Mapping[str, Any], rules: Rules, where: str) -> None:
    """The first field of ``fields`` whose value fails its rule: one line naming it (``where``: the record)."""
    for name, (ok, implemented) in rules.items():
        if name in fields and not ok(fields[name]):
            v = fields[name]
            shown = repr(v.get("_target_", v)) if isinstance(v, Mapping) else repr(v)  # Bridge's function entries
            raise RunError(f"{where}: {name}={shown} is not implemented "
                           f"(star-mcore runs Llama: {name} = {implemented})")


# config.json fields; an absent field is its default.
HF_IMPLEMENTED: Rules = {
    "hidden_act": (lambda v: v == "silu", "silu (SwiGLU)"),
    "attention_bias": (is_off, "false (no biases)"),
    "mlp_bias": (is_off, "false (no biases)"),
    "partial_rotary_factor": (lambda v: v == 1, "1.0"),
    "sliding_window": (is_off, "none (full causal attention)"),
    "use_sliding_window": (is_off, "false"),
    "attn_logit_softcapping": (is_off, "none"),
    "final_logit_softcapping": (is_off, "none"),
    "quantization_config": (is_off, "none (weights in fp32 / bf16 / fp16)"),
}


def padded_vocab_size(vocab: int, tp: int) -> int:
    """mcore's vocab-parallel layers need the vocabulary divisible by TP; pad rows are never chosen."""
    return -(-vocab // tp) * tp


def tp_shard(n: int, tp_rank: int, tp: int) -> Tuple[int, int]:
    """[start, stop) of TP rank ``tp_rank``'s equal share of ``n`` rows (heads, groups, features)."""
    per = n // tp
    return tp_rank * per, (tp_rank + 1) * per


def vocab_shard(rank_rows: int, tp_rank: int, vocab: int) -> Tuple[int, int]:
    """(first row, rows from the checkpoint) of a vocab-parallel shard of ``rank_rows`` rows: the rest of the
    shard, past the real vocabulary, is padding the loaders zero."""
    r0 = tp_rank * rank_rows
    return r0, max(0, min(rank_rows, vocab - r0))


@dataclass(frozen=True)
class LlamaArch:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    rope_scaling: Optional[Dict[str, Any]] = None
    eos_token_ids: List[int] = field(default_factory=list)

    @classmethod
    def from_hf_dir(cls, path: str | Path) -> "LlamaArch":
        return cls.from_hf_config(Path(path) / "config.json")

    @classmethod
    def from_hf_config(cls, config: str | Path) -> "LlamaArch":
        """From a config.json (and the generation_config.json beside it, for the EOS ids)."""
        config = Path(config)
        cfg = json.loads(config.read_text())
        model_type = cfg.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise RunError(f"{config}: model_type {model_type!r} is not supported "
                           f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
        heads = cfg["num_attention_heads"]
        eos = cfg.get("eos_token_id")
        # transformers >= 5 writes theta and scaling together as ``rope_parameters``.
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        fields = {**cfg, **({"partial_rotary_factor": rope["partial_rotary_factor"]}
                            if "partial_rotary_factor" in rope else {})}
        refuse_unimplemented(fields, HF_IMPLEMENTED, str(config))
        rope_type = (scaling or {}).get("rope_type", (scaling or {}).get("type", "default"))
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise RunError(f"{config}: rope_scaling rope_type={rope_type!r} is not implemented "
                           f"(implemented: {', '.join(SUPPORTED_ROPE_TYPES)})")
        gen = config.parent / "generation_config.json"
        if gen.exists():
            eos = json.loads(gen.read_text()).get("eos_token_id", eos)
        return cls(
            vocab_size=cfg["vocab_size"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-5),
            rope_theta=float(theta),
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            rope_scaling=scaling,
            eos_token_ids=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
        )
