"""Every Megatron-core name this project uses, imported here and only here, and the differences between the
releases it supports: megatron-core 0.16.1 through 0.19.x (CI tests 0.16.1 on Python 3.11 and 0.19.2 on
Python 3.12; 0.17 and later need Python >= 3.12).

Start-up notices. On first import mcore says that Transformer Engine and Apex are missing and which fallbacks
(optimizers, fused multi-tensor ops, norms) it will use instead; 0.19 adds that ``absl`` is missing and, on a
machine without CUDA, torch logs where it looked for the CUDA runtime. None of it concerns this project: it
supplies its own core attention and RoPE, and uses no optimizer or fusion, and TE's modules only where
``model.transformer_impl`` asks for mcore's TE layer spec (which needs TE installed). Those messages, and only
those, are dropped while the imports below run. Other warnings pass.

Differences between releases:

- ``TransformerConfig``'s ``cuda_graph_scope`` is ``cuda_graph_modules`` from 0.19 on; under either name the
  default (``"full"``) is deprecated and warns for every config. mcore's CUDA-graph support is not used (the
  decode loop captures its own graph with torch): the empty list is passed, under the name the installed
  release has (:func:`make_transformer_config`).
- 0.19 logs that ``GPTModel`` is deprecated in favour of ``HybridModel`` each time one is built. GPTModel is
  kept, deliberately: it is in every supported release with the same interface and the same parameter names,
  and it is mcore's model that offers Llama-3.1 RoPE scaling (``HybridModel`` in 0.19.2 builds plain or YaRN
  rotary embeddings only), although this project computes RoPE itself from position ids either way.
  ``HybridModel`` does not exist in 0.16.1, and its layer pattern splits attention and MLP into separate
  layers (other parameter names for the checkpoint loader). That one log line is dropped when the model is
  built (:func:`make_gpt_model`).
"""

from __future__ import annotations

import dataclasses
import logging
import warnings
from contextlib import contextmanager
from typing import Any, Iterator

_IMPORT_NOTICES = (
    r"(Transformer Engine and Apex are|Apex is) not installed",
    r"absl\.logging is not installed",
)


@contextmanager
def _without_log_record(logger_name: str, prefix: str) -> Iterator[None]:
    """Drop the records of one logger whose message starts with ``prefix``, inside the block."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(prefix)

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)


with warnings.catch_warnings(), _without_log_record("torch.utils.cpp_extension", "No CUDA runtime is found"):
    for _message in _IMPORT_NOTICES:
        warnings.filterwarnings("ignore", message=_message, category=UserWarning)
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.models.gpt.gpt_layer_specs import (get_gpt_layer_local_spec,
                                                          get_gpt_layer_with_transformer_engine_spec)
    from megatron.core.process_groups_config import ProcessGroupCollection
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_config import TransformerConfig

_CONFIG_FIELDS = {f.name for f in dataclasses.fields(TransformerConfig)}
_CUDA_GRAPH_KEY = "cuda_graph_modules" if "cuda_graph_modules" in _CONFIG_FIELDS else "cuda_graph_scope"


def make_transformer_config(**kwargs: Any) -> TransformerConfig:
    """``TransformerConfig(**kwargs)`` with no CUDA-graph scope, under the installed release's key."""
    return TransformerConfig(**{_CUDA_GRAPH_KEY: []}, **kwargs)


def make_gpt_model(**kwargs: Any) -> GPTModel:
    """``GPTModel(**kwargs)`` without 0.19's deprecation line (see the module's docstring for why GPTModel)."""
    with _without_log_record("megatron.core.models.gpt.gpt_model", "GPTModel IS DEPRECATED"):
        return GPTModel(**kwargs)


__all__ = ["GPTModel", "MegatronModule", "ModuleSpec", "ProcessGroupCollection", "TransformerConfig",
           "get_gpt_layer_local_spec", "get_gpt_layer_with_transformer_engine_spec", "make_gpt_model",
           "make_transformer_config", "parallel_state"]
