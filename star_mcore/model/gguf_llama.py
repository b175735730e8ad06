"""A llama.cpp GGUF file of a Llama model -> an HF checkpoint directory this project (and transformers' own
``LlamaForCausalLM``) loads: ``config.json``, ``generation_config.json``, ``model.safetensors`` (fp32),
``tokenizer.json`` and ``tokenizer_config.json`` (with the chat template the GGUF carries).

The ``gguf`` package reads the file and dequantizes its tensors; the rest is this module: the tensor names, the
undoing of llama.cpp's Q/K row order (below), the tokenizer rebuilt from the GGUF vocabulary and merges, and the
config from the GGUF metadata.

llama.cpp's converter reorders the rows of ``q_proj`` and ``k_proj`` for its RoPE, which rotates adjacent
pairs (x0, x1), (x2, x3), ... where HF rotates the two halves of each head (x_i, x_{i + d/2}): per head, row
``2j + h`` of the GGUF tensor is row ``h * d/2 + j`` of the HF one. :func:`unpermute_rows` puts them back.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import torch
from safetensors.torch import save_file

from ..errors import RunError

# GGUF tensor names -> HF Llama names ({i}: the layer).
_GLOBAL_NAMES = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                 "output.weight": "lm_head.weight"}
_LAYER_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                "ffn_down": "mlp.down_proj"}

# GGUF ``tokenizer.ggml.pre`` -> how text is split before BPE. ``smollm`` is llama.cpp's name for the SmolLM
# tokenizer: every digit alone, then GPT-2's byte-level split.
_PRE_TOKENIZERS = ("gpt-2", "smollm")
_TOKEN_CONTROL, _TOKEN_USER_DEFINED = 3, 4  # GGUF token types that are added tokens, not BPE pieces


def unpermute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's Q/K row order (rotary pairs interleaved) -> HF's (rotary halves), per head."""
    rows = w.shape[0]
    return w.reshape(n_heads, rows // n_heads // 2, 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


def permute_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """HF's Q/K row order -> llama.cpp's (what its converter does); the inverse of :func:`unpermute_rows`."""
    rows = w.shape[0]
    return w.reshape(n_heads, 2, rows // n_heads // 2, *w.shape[1:]).transpose(1, 2).reshape(w.shape)


class _Meta:
    def __init__(self, reader: Any, path: Path) -> None:
        self.reader, self.path = reader, path

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        return default if field is None else field.contents()

    def need(self, key: str) -> Any:
        value = self.get(key)
        if value is None:
            raise ValueError(f"{self.path}: no {key} in the GGUF metadata")
        return value


def _hf_name(gguf_name: str) -> Optional[str]:
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[2] in _LAYER_NAMES and parts[3] == "weight":
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    return None


def read_weights(reader: Any, meta: _Meta) -> Dict[str, torch.Tensor]:
    """Every tensor of the GGUF, dequantized to fp32, under its HF name, Q/K rows in HF's order."""
    from gguf.quants import dequantize

    n_heads, n_kv = int(meta.need("llama.attention.head_count")), int(meta.need("llama.attention.head_count_kv"))
    out: Dict[str, torch.Tensor] = {}
    for t in reader.tensors:
        name = _hf_name(t.name)
        if name is None:
            raise ValueError(f"{meta.path}: tensor {t.name!r} has no place in a Llama model")
        shape = tuple(int(n) for n in reversed(t.shape))  # GGUF lists dimensions fastest first
        w = torch.from_numpy(np.array(dequantize(t.data, t.tensor_type), dtype=np.float32)).reshape(shape)  # a copy
        if name.endswith("q_proj.weight"):
            w = unpermute_rows(w, n_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_rows(w, n_kv)
        out[name] = w.contiguous()
    return out


def _tokenizer(meta: _Meta, out: Path) -> Dict[str, Any]:
    """tokenizer.json from the GGUF's BPE vocabulary and merges; returns the special tokens for the config."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind, pre = meta.need("tokenizer.ggml.model"), meta.get("tokenizer.ggml.pre", "gpt-2")
    if kind != "gpt2" or pre not in _PRE_TOKENIZERS:
        raise ValueError(f"{meta.path}: tokenizer {kind!r} / pre-tokenizer {pre!r} is not supported "
                         f"(supported: gpt2 with {', '.join(_PRE_TOKENIZERS)})")
    tokens = list(meta.need("tokenizer.ggml.tokens"))
    types = list(meta.get("tokenizer.ggml.token_type") or [1] * len(tokens))
    merges = [tuple(m.split(" ", 1)) for m in meta.need("tokenizer.ggml.merges")]
    ids = {k: meta.get(f"tokenizer.ggml.{k}_token_id") for k in ("bos", "eos", "unknown", "padding")}
    unk = None if ids["unknown"] is None else tokens[int(ids["unknown"])]
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges, unk_token=unk,
                               fuse_unk=False, byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                         if pre == "smollm" else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.add_tokens([AddedToken(t, special=False, normalized=False)
                    for t, ty in zip(tokens, types) if ty == _TOKEN_USER_DEFINED])
    if tok.get_vocab_size() != len(tokens):
        raise ValueError(f"{meta.path}: the rebuilt tokenizer has {tok.get_vocab_size()} ids, the GGUF {len(tokens)}")
    tok.save(str(out / "tokenizer.json"))
    name = lambda key: None if ids[key] is None else tokens[int(ids[key])]  # noqa: E731
    return {"bos": ids["bos"], "eos": ids["eos"], "pad": ids["padding"], "bos_token": name("bos"),
            "eos_token": name("eos"), "unk_token": unk, "pad_token": name("padding")}


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, source: Optional[Dict[str, Any]] = None) -> Path:
    """Write the HF checkpoint of a Llama GGUF to ``out_dir`` (replaced as a whole, never left half written);
    ``source`` is recorded in ``out_dir/source.json``, written last."""
    try:
        from gguf import GGUFReader
    except ImportError:
        raise RunError("reading a GGUF file needs the gguf package: pip install 'star-mcore[smollm2]'") from None

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = GGUFReader(str(gguf_path))
    meta = _Meta(reader, gguf_path)
    arch = meta.need("general.architecture")
    if arch != "llama":
        raise ValueError(f"{gguf_path}: architecture {arch!r} is not supported (only llama)")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", dir=out_dir.parent))
    try:
        weights = read_weights(reader, meta)
        tied = "lm_head.weight" not in weights
        save_file(weights, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        vocab = int(weights["model.embed_tokens.weight"].shape[0])
        del weights
        special = _tokenizer(meta, tmp)
        heads = int(meta.need("llama.attention.head_count"))
        hidden = int(meta.need("llama.embedding_length"))
        config = {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab,
            "hidden_size": hidden, "intermediate_size": int(meta.need("llama.feed_forward_length")),
            "num_hidden_layers": int(meta.need("llama.block_count")), "num_attention_heads": heads,
            "num_key_value_heads": int(meta.get("llama.attention.head_count_kv", heads)),
            "head_dim": int(meta.get("llama.rope.dimension_count", hidden // heads)), "hidden_act": "silu",
            "rms_norm_eps": float(meta.need("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(meta.get("llama.rope.freq_base", 10000.0)), "rope_scaling": None,
            "max_position_embeddings": int(meta.need("llama.context_length")), "tie_word_embeddings": tied,
            "attention_bias": False, "mlp_bias": False, "torch_dtype": "float32",
            "bos_token_id": special["bos"], "eos_token_id": special["eos"], "pad_token_id": special["pad"],
        }
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        gen = {k: special[k] for k in ("bos", "eos", "pad") if special[k] is not None}
        (tmp / "generation_config.json").write_text(json.dumps({f"{k}_token_id": v for k, v in gen.items()},
                                                              indent=2) + "\n")
        tok_config = {"tokenizer_class": "PreTrainedTokenizerFast",
                      **{k: special[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if special[k]},
                      "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
                      "add_eos_token": False, "clean_up_tokenization_spaces": False,
                      "model_max_length": config["max_position_embeddings"]}
        template = meta.get("tokenizer.chat_template")
        if template:
            tok_config["chat_template"] = template
        (tmp / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
        (tmp / "source.json").write_text(json.dumps({"gguf": gguf_path.name, "name": meta.get("general.name"),
                                                     **(source or {})}, indent=2) + "\n")
        os.chmod(tmp, 0o755)
        for f in tmp.iterdir():
            os.chmod(f, 0o644)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        tmp.rename(out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir
