"""Load an HF Llama directory (config.json + *.safetensors, sharded or not) into a TP-sharded StarLlama.

Each rank reads only its own slices, memory-mapped through safetensors, tensor by tensor. Before that,
:func:`check_hf_files` reads every file's header: a missing, truncated or unreadable file is named.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Dict, List, Optional, Set, Tuple

import torch
from safetensors import safe_open

from ..errors import RunError, unreadable
from .arch import LlamaArch, tp_shard, vocab_shard

if TYPE_CHECKING:
    from .llama import StarLlama

Tensor = torch.Tensor


class SafetensorsReader:
    """Name -> slice access across the files of one checkpoint."""

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        index = path / "model.safetensors.index.json"
        if index.exists():
            weight_map: Dict[str, str] = json.loads(index.read_text())["weight_map"]
        else:
            files = sorted(path.glob("*.safetensors"))
            if not files:
                raise FileNotFoundError(f"no *.safetensors files in {path}")
            weight_map = {}
            for f in files:
                with safe_open(str(f), framework="pt") as h:
                    weight_map.update({k: f.name for k in h.keys()})
        self.path = path
        self.weight_map = weight_map
        self._handles: Dict[str, object] = {}
        self._unread: Dict[str, Set[str]] = {}
        for name, fname in weight_map.items():
            self._unread.setdefault(fname, set()).add(name)

    def __contains__(self, name: str) -> bool:
        return name in self.weight_map

    def read(self, name: str, rows: Optional[Tuple[int, int]] = None, cols: Optional[Tuple[int, int]] = None) -> Tensor:
        """The tensor ``name``, or only rows [r0, r1) and/or columns [c0, c1) of a 2-D one."""
        if name not in self.weight_map:
            raise KeyError(f"tensor {name!r} is missing from the checkpoint in {self.path}")
        fname = self.weight_map[name]
        if fname not in self._handles:
            self._handles[fname] = safe_open(str(self.path / fname), framework="pt")
        sl = self._handles[fname].get_slice(name)
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        out = sl[r, c] if len(sl.get_shape()) == 2 else sl[r]
        # Once every tensor of a file has been read, let its mapping go with the last slice taken from it:
        # the pages this rank touched stay mapped one file at a time, not for the whole checkpoint.
        unread = self._unread[fname]
        unread.discard(name)
        if not unread:
            del self._handles[fname]
        return out


def check_hf_files(path: Path, arch: LlamaArch) -> None:
    """Every weight file exists, is readable and is as long as its header says; an untied model has its head."""
    index = path / "model.safetensors.index.json"
    if index.exists():
        try:
            files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as e:
            raise unreadable(index, e) from None
    else:
        files = sorted(f.name for f in path.glob("*.safetensors"))
        if not files:
            raise RunError(f"{path}: no *.safetensors weights")
    names: Set[str] = set()
    for name in files:
        f = path / name
        if not f.is_file():
            raise RunError(f"{f}: missing ({index.name} lists it)")
        try:
            with open(f, "rb") as h:
                n = int.from_bytes(h.read(8), "little")
                header = json.loads(h.read(n))
            end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
        except (OSError, ValueError, KeyError, TypeError, IndexError) as e:
            raise unreadable(f, e) from None
        if f.stat().st_size < 8 + n + end:
            raise RunError(f"{f}: truncated ({f.stat().st_size} bytes; its header describes {8 + n + end})")
        names.update(k for k in header if k != "__metadata__")
    if not arch.tie_word_embeddings and "lm_head.weight" not in names:
        raise RunError(f"{path}: config.json says tie_word_embeddings=false, but no weight file holds lm_head.weight")


@torch.no_grad()
def load_hf_llama(model: "StarLlama", path: str | Path, tp_rank: int, tp: int) -> None:
    """Copy the checkpoint's weights into ``model`` (this TP rank's shards), converting to its dtype.

    Every slice is copied straight from the memory-mapped file into its place in the parameter (fused QKV,
    [gate; up], padded vocabulary rows), converting dtype on the way: the load allocates no tensors of its own.
    """
    a = model.arch
    reader = SafetensorsReader(path)
    params = dict(model.gpt.named_parameters())
    loaded: List[str] = []

    def target(name: str) -> Tensor:
        loaded.append(name)
        return params[name].detach()

    def copy(dst: Tensor, value: Tensor, name: str) -> None:
        if dst.shape != value.shape:
            raise ValueError(f"{name}: checkpoint shard has shape {tuple(value.shape)}, "
                             f"model expects {tuple(dst.shape)}")
        dst.copy_(value)

    def put(name: str, value: Tensor) -> None:
        copy(target(name), value, name)

    def put_vocab_rows(name: str, src: str) -> None:
        # This rank's rows of the vocabulary, padded to the model's (TP-divisible) size with zero rows.
        dst = target(name)
        r0, n = vocab_shard(dst.shape[0], tp_rank, a.vocab_size)
        if n:
            copy(dst[:n], reader.read(src, rows=(r0, r0 + n)), name)
        dst[n:].zero_()

    # In checkpoint order (embedding, layers, final norm, head), so that each file is done with in turn.
    put_vocab_rows("embedding.word_embeddings.weight", "model.embed_tokens.weight")

    hd, ng = a.head_dim, a.num_kv_heads
    qpg = a.num_heads // ng  # query heads per KV group
    g0, g1 = tp_shard(ng, tp_rank, tp)
    f0, f1 = tp_shard(a.intermediate_size, tp_rank, tp)
    c0, c1 = tp_shard(a.num_heads * hd, tp_rank, tp)
    for i in range(a.num_layers):
        src, dst = f"model.layers.{i}.", f"decoder.layers.{i}."
        attn_norm, mlp_norm = model.layer_norm_names  # modules of their own, or fused into TE's linears
        put(dst + attn_norm, reader.read(src + "input_layernorm.weight"))
        put(dst + mlp_norm, reader.read(src + "post_attention_layernorm.weight"))
        # mcore's fused QKV is grouped: for each KV group, its query heads, then its K head, then its V head.
        name, n = dst + "self_attention.linear_qkv.weight", g1 - g0
        qkv = target(name).view(n, (qpg + 2) * hd, -1)
        q = reader.read(src + "self_attn.q_proj.weight", rows=(g0 * qpg * hd, g1 * qpg * hd))
        copy(qkv[:, : qpg * hd], q.reshape(n, qpg * hd, -1), name)
        k = reader.read(src + "self_attn.k_proj.weight", rows=(g0 * hd, g1 * hd))
        copy(qkv[:, qpg * hd: (qpg + 1) * hd], k.reshape(n, hd, -1), name)
        v = reader.read(src + "self_attn.v_proj.weight", rows=(g0 * hd, g1 * hd))
        copy(qkv[:, (qpg + 1) * hd:], v.reshape(n, hd, -1), name)
        del q, k, v  # a live slice keeps its whole file mapped
        put(dst + "self_attention.linear_proj.weight", reader.read(src + "self_attn.o_proj.weight", cols=(c0, c1)))
        # SwiGLU fc1 is [gate; up] on every TP rank.
        name = dst + "mlp.linear_fc1.weight"
        fc1 = target(name)
        copy(fc1[: f1 - f0], reader.read(src + "mlp.gate_proj.weight", rows=(f0, f1)), name)
        copy(fc1[f1 - f0:], reader.read(src + "mlp.up_proj.weight", rows=(f0, f1)), name)
        put(dst + "mlp.linear_fc2.weight", reader.read(src + "mlp.down_proj.weight", cols=(f0, f1)))

    put("decoder.final_layernorm.weight", reader.read("model.norm.weight"))
    if not a.tie_word_embeddings:  # tied: the output layer uses the embedding, loaded above, and has no weight
        put_vocab_rows("output_layer.weight", "lm_head.weight")

    missing = sorted(set(params) - set(loaded))
    if missing:
        raise ValueError(f"model parameters not filled from the checkpoint: {', '.join(missing[:5])}")
