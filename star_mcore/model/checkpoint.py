"""The checkpoint a run's config names, ``checkpoint.hf_path`` or ``checkpoint.megatron_path``: its
architecture, its tokenizer directory, the check of its weight files and the loader of its weights. The one
place that tells the two formats apart. Imports no megatron-core (``star-mcore plan`` opens checkpoints too).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Dict, List, Optional, Tuple

import yaml

from ..config import CheckpointConfig
from ..errors import RunError, unreadable
from .arch import LlamaArch
from .hf_checkpoint import check_hf_files, load_hf_llama
from .megatron_arch import arch_from_megatron
from .megatron_checkpoint import (DcpCheckpoint, check_weights, iteration_dir, load_megatron_llama,
                                  saved_vocab_rows)

if TYPE_CHECKING:
    from .llama import StarLlama

BRIDGE_CONFIG = "run_config.yaml"


@dataclass(frozen=True)
class Checkpoint:
    """An opened checkpoint. ``name``: how messages name it (``checkpoint.hf_path=...``)."""

    name: str
    arch: LlamaArch
    tokenizer_dir: str  # where text requests' tokenizer is looked for
    check_files: Callable[[], None]  # a missing, truncated or unreadable weight file: RunError naming it
    _load: Callable[["StarLlama", int, int], None]

    def load(self, model: "StarLlama", tp_rank: int, tp: int) -> None:
        """This TP rank's shards of the weights, into ``model`` (built from :attr:`arch`)."""
        self._load(model, tp_rank, tp)


def open_checkpoint(c: CheckpointConfig) -> Checkpoint:
    """Reads the architecture and checks it (config.validate has made sure exactly one path is set)."""
    return _open_hf(Path(c.hf_path)) if c.hf_path else _open_megatron(c)


def _open_hf(path: Path) -> Checkpoint:
    name = f"checkpoint.hf_path={path}"
    if not (path / "config.json").is_file():
        raise RunError(f"{name}: not an HF checkpoint directory (no config.json)")
    try:
        arch = LlamaArch.from_hf_dir(path)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"{name}: cannot read config.json: {e}") from None
    return Checkpoint(name, arch, str(path), lambda: check_hf_files(path, arch),
                      lambda model, tp_rank, tp: load_hf_llama(model, path, tp_rank, tp))


def _open_megatron(c: CheckpointConfig) -> Checkpoint:
    name = f"checkpoint.megatron_path={c.megatron_path}"
    try:
        it = iteration_dir(c.megatron_path, c.iteration)
        dcp = DcpCheckpoint(it)
    except RunError as e:
        raise RunError(f"{name}: {e}") from None
    tokenizer = Path(c.tokenizer_path) if c.tokenizer_path else it / "tokenizer"
    arch = _megatron_arch(c, it, dcp, eos_token_ids(tokenizer))
    check_weights(dcp, arch)
    return Checkpoint(name, arch, str(tokenizer), dcp.check_files,
                      lambda model, tp_rank, tp: load_megatron_llama(model, dcp, tp_rank, tp))


def _recorded_config(it: Path, dcp: DcpCheckpoint) -> Optional[Tuple[Dict[str, Any], str, str]]:
    """(fields, kind, how messages name them) of the run's own record: Bridge's run_config.yaml, else
    Megatron-LM's saved args; None where the checkpoint has neither."""
    bridge = it / BRIDGE_CONFIG
    if bridge.is_file():
        try:
            model = (yaml.safe_load(bridge.read_text()) or {}).get("model")
        except (OSError, yaml.YAMLError, AttributeError) as e:
            raise unreadable(bridge, e) from None
        if not isinstance(model, dict):
            raise RunError(f"{bridge}: no model section")
        return model, "bridge", f"{bridge} (model)"
    args = dcp.common_state().get("args")
    if args is None:
        return None
    return vars(args), "args", f"{it / 'common.pt' if (it / 'common.pt').is_file() else it}: the saved args"


def _megatron_arch(c: CheckpointConfig, it: Path, dcp: DcpCheckpoint, eos: List[int]) -> LlamaArch:
    """From the run's own record, else ``checkpoint.hf_config``."""
    rows = saved_vocab_rows(dcp)
    record = _recorded_config(it, dcp)
    if record is not None:
        if c.hf_config:
            raise RunError(f"checkpoint.hf_config={c.hf_config}: the checkpoint records its own architecture "
                           f"({record[2]}); leave checkpoint.hf_config empty")
        return arch_from_megatron(*record, rows, eos)
    if not c.hf_config:
        raise RunError(f"checkpoint.megatron_path={c.megatron_path}: {it} records no architecture (no "
                       f"{BRIDGE_CONFIG}, no saved args); set checkpoint.hf_config to the model's config.json")
    config = Path(c.hf_config)
    config = config / "config.json" if config.is_dir() else config
    if not config.is_file():
        raise RunError(f"checkpoint.hf_config={c.hf_config}: file not found")
    try:
        arch = LlamaArch.from_hf_config(config)
    except (ValueError, KeyError, TypeError) as e:
        raise RunError(f"checkpoint.hf_config={c.hf_config}: cannot read it: {e}") from None
    if arch.vocab_size > rows:
        raise RunError(f"checkpoint.hf_config={c.hf_config}: vocab_size={arch.vocab_size} exceeds the {rows} rows "
                       "of the saved embedding")
    return arch


def eos_token_ids(tokenizer: Path) -> List[int]:
    """The EOS id(s) of a tokenizer directory without loading it: generation_config.json's, else the id of
    tokenizer_config.json's ``eos_token`` in tokenizer.json; none where neither says."""
    gen = tokenizer / "generation_config.json"
    if gen.is_file():
        eos = json.loads(gen.read_text()).get("eos_token_id")
        return [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
    token = _eos_token(tokenizer / "tokenizer_config.json")
    if token is None or not (tokenizer / "tokenizer.json").is_file():
        return []
    tok = json.loads((tokenizer / "tokenizer.json").read_text())
    ids = [t["id"] for t in tok.get("added_tokens", []) if t.get("content") == token]
    vocab = (tok.get("model") or {}).get("vocab")
    if not ids and isinstance(vocab, dict) and token in vocab:
        ids = [vocab[token]]
    return ids[:1]


def _eos_token(config: Path) -> Optional[str]:
    if not config.is_file():
        return None
    eos = json.loads(config.read_text()).get("eos_token")
    return eos.get("content") if isinstance(eos, dict) else eos
