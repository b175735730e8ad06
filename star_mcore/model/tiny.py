"""Deterministic random Llama checkpoints in HF layout, for the demo and the tests (no hub downloads)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from safetensors.torch import save_file


def make_tiny_llama(path: str | Path, *, vocab_size: int = 256, hidden_size: int = 64, intermediate_size: int = 128,
                    num_layers: int = 2, num_heads: int = 4, num_kv_heads: int = 2, head_dim: Optional[int] = None,
                    rope_theta: float = 10000.0, rope_scaling: Optional[Dict[str, Any]] = None,
                    max_position_embeddings: int = 8192, tie_word_embeddings: bool = False,
                    eos_token_id: Optional[int] = None, seed: int = 0) -> Path:
    """Write config.json, generation_config.json and model.safetensors of a random Llama to ``path``."""
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    head_dim = head_dim or hidden_size // num_heads
    g = torch.Generator().manual_seed(seed)

    def lin(out_f: int, in_f: int) -> torch.Tensor:
        return torch.randn(out_f, in_f, generator=g) / in_f ** 0.5

    def norm(n: int) -> torch.Tensor:
        return 1.0 + 0.1 * torch.randn(n, generator=g)

    w = {"model.embed_tokens.weight": torch.randn(vocab_size, hidden_size, generator=g),
         "model.norm.weight": norm(hidden_size)}
    if not tie_word_embeddings:
        w["lm_head.weight"] = lin(vocab_size, hidden_size)
    for i in range(num_layers):
        p = f"model.layers.{i}."
        w[p + "input_layernorm.weight"] = norm(hidden_size)
        w[p + "post_attention_layernorm.weight"] = norm(hidden_size)
        w[p + "self_attn.q_proj.weight"] = lin(num_heads * head_dim, hidden_size)
        w[p + "self_attn.k_proj.weight"] = lin(num_kv_heads * head_dim, hidden_size)
        w[p + "self_attn.v_proj.weight"] = lin(num_kv_heads * head_dim, hidden_size)
        w[p + "self_attn.o_proj.weight"] = lin(hidden_size, num_heads * head_dim)
        w[p + "mlp.gate_proj.weight"] = lin(intermediate_size, hidden_size)
        w[p + "mlp.up_proj.weight"] = lin(intermediate_size, hidden_size)
        w[p + "mlp.down_proj.weight"] = lin(hidden_size, intermediate_size)
    save_file({k: v.contiguous() for k, v in w.items()}, str(path / "model.safetensors"), metadata={"format": "pt"})
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": head_dim,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": rope_theta, "rope_scaling": rope_scaling,
        "max_position_embeddings": max_position_embeddings, "tie_word_embeddings": tie_word_embeddings,
        "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
        "bos_token_id": None, "eos_token_id": eos_token_id,
    }
    (path / "config.json").write_text(json.dumps(config, indent=2))
    (path / "generation_config.json").write_text(json.dumps({"eos_token_id": eos_token_id}, indent=2))
    return path


def train_tiny_tokenizer(path: str | Path, texts: List[str], vocab_size: int = 96) -> Path:
    """Train a small BPE on ``texts`` (alphabet: the characters they use; spaces kept as a word-start mark so
    decoding restores them) and save it in HF layout (tokenizer.json + tokenizer_config.json) with
    <unk> / <s> / </s> specials, so AutoTokenizer loads it offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="never")
    tok.decoder = decoders.Metaspace(prepend_scheme="never")
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>", "</s>"]))
    if tok.get_vocab_size() > vocab_size:
        raise ValueError(f"the texts use more distinct characters than a vocabulary of {vocab_size} holds")
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "model_max_length": 1 << 30}, indent=2))
    return path
