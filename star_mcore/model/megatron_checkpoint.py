"""Read a megatron-core ``torch_dist`` checkpoint (Megatron-LM's or Megatron-Bridge's) into a TP-sharded StarLlama.

Layout. A save directory holds the tracker ``latest_checkpointed_iteration.txt`` and ``iter_0000100/`` (7 digits);
an iteration directory holds ``metadata.json`` (the backend, ``torch_dist``), torch DCP's ``.metadata`` index,
the ``*.distcp`` data files and the common (non-tensor) state: ``common.pt`` up to megatron-core 0.18, a DCP
byte entry ``common_state/shard_0_1`` from 0.19 on. Bridge adds ``run_config.yaml`` and ``tokenizer/``.

Tensors are saved under their *global* shapes, whatever the TP size of the run: the layers of a homogeneous
decoder are stacked on a leading axis (``decoder.layers.self_attention.linear_qkv.weight`` [L, (q+2k)·d, h]),
the fused QKV rows grouped per KV group (as this model's), SwiGLU's fc1 as [gate; up] over the whole
intermediate size, the embedding and output layer with the run's padded vocabulary. So resharding is choosing
boxes: each rank asks torch DCP's file reader for exactly the boxes of its own parameters and they are copied
into place, file by file (a rank holds its shards plus one saved chunk at a time). megatron-core is not used:
one reader serves every release's checkpoint under every release.

Names. Megatron's TE spec fuses the norms into the next linear (``linear_qkv.layer_norm_weight``,
``linear_fc1.layer_norm_weight``), and mcore's local spec saves under those names too; a checkpoint written
without that mapping has ``input_layernorm.weight`` / ``pre_mlp_layernorm.weight``. Both load. TE's
``_extra_state`` entries (fp8 scaling state), optimizer state, RNG state and MTP layers are not read; any other
model weight (a bias, a q/k norm, an expert) is refused by name rather than ignored.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import types
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Dict, List, Optional, Tuple

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, ReadItem
from torch.distributed.checkpoint.planner_helpers import create_read_items_for_chunk_list

from ..errors import RunError, unreadable
from .arch import LlamaArch, tp_shard, vocab_shard

if TYPE_CHECKING:
    from .llama import StarLlama

Tensor = torch.Tensor
TRACKER = "latest_checkpointed_iteration.txt"
WEIGHT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Entries that are not model weights, or not part of the next-token forward pass.
_NOT_READ = re.compile(r"(^|\.)_extra_state(/|$)|^optimizer\.|^rng_state|^rerun_state|^mtp\.|^common_state/")
# our parameter (in layer i) -> the checkpoint's names for it, the TE-spec name first
_LAYER_NAMES = {
    "input_layernorm.weight": ("self_attention.linear_qkv.layer_norm_weight", "input_layernorm.weight"),
    "pre_mlp_layernorm.weight": ("mlp.linear_fc1.layer_norm_weight", "pre_mlp_layernorm.weight"),
    "self_attention.linear_qkv.weight": ("self_attention.linear_qkv.weight",),
    "self_attention.linear_proj.weight": ("self_attention.linear_proj.weight",),
    "mlp.linear_fc1.weight": ("mlp.linear_fc1.weight",),
    "mlp.linear_fc2.weight": ("mlp.linear_fc2.weight",),
}


def iteration_dir(path: str | Path, iteration: int = -1) -> Path:
    """The iteration directory ``path`` names: itself, or in a save directory ``iter_{iteration:07d}`` (-1: the
    one its tracker file names; ``release`` where it says so)."""
    path = Path(path)
    if (path / "metadata.json").is_file() or (path / ".metadata").is_file() or any(path.glob("mp_rank_*")):
        if iteration != -1:
            raise RunError(f"{path} is an iteration directory; checkpoint.iteration={iteration} applies to the save "
                           "directory above it")
        return path
    if not path.is_dir():
        raise RunError(f"{path}: no such directory")
    if iteration == -1:
        tracker = path / TRACKER
        if not tracker.is_file():
            raise RunError(f"{path}: neither a torch_dist checkpoint (no metadata.json) nor a save directory "
                           f"(no {TRACKER})")
        text = tracker.read_text().strip()
        if not (text.isdigit() or text == "release"):
            raise RunError(f"{tracker}: names no iteration (it holds {text[:40]!r})")
        found = path / ("release" if text == "release" else f"iter_{int(text):07d}")
    else:
        found = path / f"iter_{iteration:07d}"
    if not found.is_dir():
        have = sorted(p.name for p in path.glob("iter_*"))
        raise RunError(f"{found}: no such checkpoint iteration (this save directory has: {', '.join(have) or 'none'})")
    return found


class _Opaque:
    """Stands in for a class of the training code (an enum, a config object) found in the saved args: the
    arguments star-mcore reads are plain values, so nothing of megatron is imported to unpickle them."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args

    def __setstate__(self, state: Any) -> None:
        self.state = state

    def __repr__(self) -> str:
        return f"{type(self).__module__}.{type(self).__qualname__}{self.args!r}"


class _RecordUnpickler(pickle.Unpickler):
    """Builds plain values, tensors and ``argparse.Namespace``; every other class becomes an :class:`_Opaque`."""

    SAFE = {("argparse", "Namespace"), ("collections", "OrderedDict"), ("builtins", "set"),
            ("builtins", "frozenset"), ("builtins", "slice"), ("builtins", "complex"), ("_codecs", "encode"),
            ("torch", "Size"), ("torch", "device"), ("pathlib", "PosixPath"), ("pathlib", "WindowsPath")}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in self.SAFE or (module == "torch._utils" and name.startswith("_rebuild")) or (
                module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)):
            return super().find_class(module, name)
        return type(name, (_Opaque,), {"__module__": module, "__qualname__": name})


_record_pickle = types.ModuleType("star_mcore_record_pickle")
_record_pickle.Unpickler = _RecordUnpickler
_record_pickle.load = lambda f, **kw: _RecordUnpickler(f, **kw).load()


def _load_record(f: Any) -> Any:
    return torch.load(f, map_location="cpu", weights_only=False, pickle_module=_record_pickle)


class _Boxes:
    """What DCP's file reader asks a load planner for: where each read box lands (a view of a parameter),
    and the byte entries it read."""

    def __init__(self) -> None:
        self.dest: Dict[Tuple[str, Tuple[int, ...]], Tensor] = {}
        self.bytes: Dict[str, bytes] = {}

    def resolve_tensor(self, item: ReadItem) -> Tensor:
        out = self.dest[(item.dest_index.fqn, tuple(item.dest_index.offset))]
        for dim, (start, length) in enumerate(zip(item.dest_offsets, item.lengths)):
            out = out.narrow(dim, start, length)
        return out

    def commit_tensor(self, item: ReadItem, tensor: Tensor) -> None:
        pass  # copied into place by the reader

    def load_bytes(self, item: ReadItem, value: io.BytesIO) -> None:
        self.bytes[item.dest_index.fqn] = value.read()


class DcpCheckpoint:
    """One iteration directory: its DCP index, the files it needs, reads of boxes and byte entries."""

    def __init__(self, path: Path) -> None:
        self.path = path
        meta = path / "metadata.json"
        if any(path.glob("mp_rank_*")):
            raise RunError(f"{path}: a legacy 'torch' checkpoint (mp_rank_*/model_optim_rng.pt); only ckpt_format "
                           "torch_dist is read (Megatron-LM: --ckpt-format torch_dist, or convert it)")
        if meta.is_file():
            backend = json.loads(meta.read_text()).get("sharded_backend")
            if backend != "torch_dist":
                raise RunError(f"{meta}: sharded_backend={backend!r}; only torch_dist checkpoints are read")
        if not (path / ".metadata").is_file():
            raise RunError(f"{path}: not a torch_dist checkpoint (no .metadata index)")
        self.reader = FileSystemReader(str(path))
        try:
            self.metadata = self.reader.read_metadata()
        except Exception as e:  # noqa: BLE001 - a damaged index, whatever the unpickler says
            raise unreadable(path / ".metadata", e) from None
        self.reader.set_up_storage_reader(self.metadata, is_coordinator=True)
        self.entries = self.metadata.state_dict_metadata

    def tensor(self, fqn: str) -> Optional[TensorStorageMetadata]:
        md = self.entries.get(fqn)
        return md if isinstance(md, TensorStorageMetadata) else None

    def check_files(self) -> None:
        """Every data file the index points into exists, is readable and is as long as the index says."""
        need: Dict[str, int] = {}
        for info in self.reader.storage_data.values():
            need[info.relative_path] = max(need.get(info.relative_path, 0), info.offset + info.length)
        for name, length in sorted(need.items()):
            f = self.path / name
            if not f.is_file():
                raise RunError(f"{f}: missing (the checkpoint's index needs it)")
            if not os.access(f, os.R_OK):
                raise RunError(f"{f}: cannot be read (permission denied)")
            size = f.stat().st_size
            if size < length:
                raise RunError(f"{f}: truncated ({size} bytes; the checkpoint's index needs {length})")

    def read(self, boxes: _Boxes, wants: List[Tuple[str, Tuple[int, ...], Tensor]]) -> None:
        """Fill each ``(fqn, global offsets, destination)`` box from the files, one file at a time."""
        per_file: Dict[str, List[ReadItem]] = OrderedDict()
        for fqn, offsets, dest in wants:
            boxes.dest[(fqn, tuple(offsets))] = dest
            chunk = ChunkStorageMetadata(offsets=torch.Size(offsets), sizes=dest.shape)
            for item in create_read_items_for_chunk_list(fqn, self.entries[fqn], [chunk]):
                per_file.setdefault(self.reader.storage_data[item.storage_index].relative_path, []).append(item)
        for name in sorted(per_file):
            self._read_file(name, per_file[name], boxes)

    def _read_file(self, name: str, items: List[ReadItem], boxes: _Boxes) -> None:
        try:
            self.reader.read_data(LoadPlan(items), boxes).wait()
        except Exception as e:  # noqa: BLE001 - a damaged file, whatever torch.load says
            raise unreadable(self.path / name, e) from None

    def read_bytes(self, fqn: str) -> bytes:
        """One byte entry (a pickled object), read whole."""
        item = ReadItem(type=LoadItemType.BYTE_IO, dest_index=MetadataIndex(fqn), dest_offsets=torch.Size(()),
                        storage_index=MetadataIndex(fqn), storage_offsets=torch.Size(()), lengths=torch.Size(()))
        boxes = _Boxes()
        self._read_file(self.reader.storage_data[item.storage_index].relative_path, [item], boxes)
        return boxes.bytes[fqn]

    def common_state(self) -> Dict[str, Any]:
        """The non-tensor state (``args``, ``iteration``, ...): ``common.pt``, or the DCP entry of 0.19 on."""
        common = self.path / "common.pt"
        key = next((k for k in self.entries if k.startswith("common_state/")), None)
        if common.is_file():
            data, where = common.read_bytes(), common
        elif key is not None:
            data, where = self.read_bytes(key), self.path / self.reader.storage_data[MetadataIndex(key)].relative_path
        else:
            return {}
        try:
            state = _load_record(io.BytesIO(data))
        except Exception as e:  # noqa: BLE001 - a damaged file, whatever the unpickler says
            raise unreadable(where, e) from None
        return state if where == common else state[0]  # the DCP entry is a one-element list


@dataclass(frozen=True)
class LayerTensor:
    """Where layer ``i``'s copy of one parameter lives: a per-layer entry, or row ``i`` of a stacked one."""

    fqn: str
    prefix: Tuple[int, ...]  # () or (i,)


def _layer_tensor(ckpt: DcpCheckpoint, i: int, ours: str, num_layers: int) -> LayerTensor:
    for name in _LAYER_NAMES[ours]:
        if ckpt.tensor(f"decoder.layers.{i}.{name}") is not None:
            return LayerTensor(f"decoder.layers.{i}.{name}", ())
        md = ckpt.tensor(f"decoder.layers.{name}")
        if md is not None and md.size[0] == num_layers:
            return LayerTensor(f"decoder.layers.{name}", (i,))
    raise RunError(f"{ckpt.path}: no weight for layer {i}'s {ours} (looked for "
                   + ", ".join(f"decoder.layers.{n}" for n in _LAYER_NAMES[ours]) + ")")


def _used_names(ckpt: DcpCheckpoint, arch: LlamaArch) -> Dict[str, Tuple[int, ...]]:
    """Every checkpoint tensor the model reads -> the global shape it must have."""
    a, hd = arch, arch.head_dim
    per_layer = {
        "input_layernorm.weight": (a.hidden_size,),
        "pre_mlp_layernorm.weight": (a.hidden_size,),
        "self_attention.linear_qkv.weight": ((a.num_heads + 2 * a.num_kv_heads) * hd, a.hidden_size),
        "self_attention.linear_proj.weight": (a.hidden_size, a.num_heads * hd),
        "mlp.linear_fc1.weight": (2 * a.intermediate_size, a.hidden_size),
        "mlp.linear_fc2.weight": (a.hidden_size, a.intermediate_size),
    }
    used: Dict[str, Tuple[int, ...]] = {"decoder.final_layernorm.weight": (a.hidden_size,)}
    for i in range(a.num_layers):
        for ours, shape in per_layer.items():
            t = _layer_tensor(ckpt, i, ours, a.num_layers)
            used[t.fqn] = (a.num_layers, *shape) if t.prefix else shape
    return used


def saved_vocab_rows(ckpt: DcpCheckpoint) -> int:
    md = ckpt.tensor("embedding.word_embeddings.weight")
    if md is None:
        raise RunError(f"{ckpt.path}: no embedding.word_embeddings.weight (not a GPT model checkpoint)")
    return int(md.size[0])


def check_weights(ckpt: DcpCheckpoint, arch: LlamaArch) -> None:
    """The checkpoint's tensors are this architecture's, in a weight dtype, and nothing else of the model:
    a tensor the model would not read (a bias, a q/k norm, an expert) is refused by name; a tied embedding
    with a saved output layer, or an untied one without, is refused."""
    used = _used_names(ckpt, arch)
    rows = saved_vocab_rows(ckpt)
    used["embedding.word_embeddings.weight"] = (rows, arch.hidden_size)
    head = ckpt.tensor("output_layer.weight")
    if arch.tie_word_embeddings and head is not None:
        raise RunError(f"{ckpt.path}: the run's config ties the output layer to the embedding, but the checkpoint "
                       "holds a separate output_layer.weight")
    if not arch.tie_word_embeddings:
        if head is None:
            raise RunError(f"{ckpt.path}: the run's config has an untied output layer, but the checkpoint holds no "
                           "output_layer.weight")
        used["output_layer.weight"] = (rows, arch.hidden_size)
    for fqn, md in ckpt.entries.items():
        if _NOT_READ.search(fqn):
            continue
        if fqn not in used:
            raise RunError(f"{ckpt.path}: checkpoint tensor {fqn} is not part of the Llama star-mcore runs "
                           "(refused rather than ignored)")
        if not isinstance(md, TensorStorageMetadata):
            continue
        if tuple(md.size) != used[fqn]:
            raise RunError(f"{ckpt.path}: {fqn} has shape {tuple(md.size)}; the run's config implies {used[fqn]}")
        if md.properties.dtype not in WEIGHT_DTYPES:
            raise RunError(f"{ckpt.path}: {fqn} is stored as {md.properties.dtype}; only fp32 / bf16 / fp16 weights "
                           "are read")


@torch.no_grad()
def load_megatron_llama(model: "StarLlama", ckpt: DcpCheckpoint, tp_rank: int, tp: int) -> None:
    """Copy this TP rank's boxes of the checkpoint's global tensors into ``model``'s parameters, converting
    to its dtype on the way (:func:`check_weights` first)."""
    a = model.arch
    params = {k: p.detach() for k, p in model.gpt.named_parameters()}
    wants: List[Tuple[str, Tuple[int, ...], Tensor]] = []
    filled = set()

    def want(ours: str, fqn: str, offsets: Tuple[int, ...], dest: Tensor) -> None:
        filled.add(ours)
        wants.append((fqn, offsets, dest))

    def vocab(ours: str, fqn: str) -> None:
        # This rank's rows of the vocabulary, padded to the model's (TP-divisible) size with zero rows.
        dst = params[ours]
        r0, n = vocab_shard(dst.shape[0], tp_rank, a.vocab_size)
        dst[n:].zero_()
        filled.add(ours)
        if n:
            want(ours, fqn, (r0, 0), dst[:n])

    vocab("embedding.word_embeddings.weight", "embedding.word_embeddings.weight")
    ng, qpg, hd = a.num_kv_heads, a.num_heads // a.num_kv_heads, a.head_dim
    g0, _ = tp_shard(ng, tp_rank, tp)
    f0, f1 = tp_shard(a.intermediate_size, tp_rank, tp)
    c0, _ = tp_shard(a.num_heads * hd, tp_rank, tp)
    for i in range(a.num_layers):
        def put(ours: str, offsets: Tuple[int, ...], dest: Tensor, name: str = "") -> None:
            """``ours``: the checkpoint tensor's local-spec name; ``name``: the model's, where it differs."""
            t = _layer_tensor(ckpt, i, ours, a.num_layers)
            if t.prefix:
                dest = dest.unsqueeze(0)
            want(f"decoder.layers.{i}.{name or ours}", t.fqn, t.prefix + offsets, dest)

        p = f"decoder.layers.{i}."
        attn_norm, mlp_norm = model.layer_norm_names  # modules of their own, or fused into TE's linears
        put("input_layernorm.weight", (0,), params[p + attn_norm], attn_norm)
        put("pre_mlp_layernorm.weight", (0,), params[p + mlp_norm], mlp_norm)
        qkv = params[p + "self_attention.linear_qkv.weight"]
        put("self_attention.linear_qkv.weight", (g0 * (qpg + 2) * hd, 0), qkv)  # whole KV groups: contiguous rows
        put("self_attention.linear_proj.weight", (0, c0), params[p + "self_attention.linear_proj.weight"])
        fc1 = params[p + "mlp.linear_fc1.weight"]
        put("mlp.linear_fc1.weight", (f0, 0), fc1[: f1 - f0])  # gate
        put("mlp.linear_fc1.weight", (a.intermediate_size + f0, 0), fc1[f1 - f0:])  # up
        put("mlp.linear_fc2.weight", (0, f0), params[p + "mlp.linear_fc2.weight"])
    want("decoder.final_layernorm.weight", "decoder.final_layernorm.weight", (0,),
         params["decoder.final_layernorm.weight"])
    if not a.tie_word_embeddings:
        vocab("output_layer.weight", "output_layer.weight")
    missing = sorted(set(params) - filled)
    if missing:
        raise ValueError(f"model parameters not filled from the checkpoint: {', '.join(missing[:5])}")
    ckpt.read(_Boxes(), wants)
