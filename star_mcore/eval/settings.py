"""What makes an eval result: the setting recorded with every sample, and how records from older versions
(written before a setting key existed) are read."""

from __future__ import annotations

import dataclasses
from typing import Any, Dict

from ..config import InferenceConfig, RunConfig

# inference keys that do not change what is generated
_NOT_SETTING = ("input_path", "output_path", "save_logits", "tokens_to_generate", "attention_backend",
                "max_batch_size", "kv_page_size")
_DEFAULTS = {k: v for k, v in dataclasses.asdict(InferenceConfig()).items() if k not in _NOT_SETTING}


def setting_of(cfg: RunConfig) -> Dict[str, Any]:
    """What makes a result: model, hosts, mode and its sizes (every other inference key too), seed, budget."""
    inf = {k: v for k, v in dataclasses.asdict(cfg.inference).items() if k not in _NOT_SETTING}
    return {"model": cfg.checkpoint.hf_path or cfg.checkpoint.megatron_path, "hosts": cfg.model.context_parallel_size,
            "precision": cfg.model.precision, **inf, "seed": cfg.eval.seed,
            "tokens_to_generate": cfg.eval.tokens_to_generate}


def complete_setting(recorded: Dict[str, Any]) -> Dict[str, Any]:
    """A recorded setting with the inference keys it predates filled in with their defaults: results written
    before a key existed were made with its default, so they still resume and report as the same setting."""
    return {**_DEFAULTS, **recorded}
