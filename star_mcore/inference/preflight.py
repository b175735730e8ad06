"""Checks every command can make before process groups and weights exist: the checkpoint, the world size, the
attention kernel, the input's longest request. Megatron-core is not imported here (``star-mcore plan`` runs
these checks and starts in a second or two); the launched part of :func:`preflight` imports what it needs."""

from __future__ import annotations

import os
from typing import Optional, Tuple

import torch

from ..config import RunConfig
from ..errors import RunError
from ..model.arch import LlamaArch
from ..model.checkpoint import open_checkpoint
from ..ops.attention import resolve_backend
from .requests import Tokenizer, parse_request, read_lines


def preflight(cfg: RunConfig, launched: bool = True) -> LlamaArch:
    """What every command can check before process groups and weights exist (``launched``: also that the
    world size matches TP x CP, which only holds inside the job)."""
    ckpt = open_checkpoint(cfg.checkpoint)  # the architecture, read and checked against what is implemented
    arch = ckpt.arch
    if cfg.inference.apply_chat_template and not Tokenizer(ckpt.tokenizer_dir).has_chat_template():
        raise RunError(f"inference.apply_chat_template=true, but the tokenizer in {ckpt.tokenizer_dir} has no chat "
                       "template")
    tp, cp = cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if launched and world != tp * cp:
        raise RunError(f"world size {world} != tensor_model_parallel_size ({tp}) x context_parallel_size ({cp}); "
                       f"launch {tp * cp} processes (torchrun --nproc-per-node={tp * cp})")
    if arch.num_heads % tp or arch.num_kv_heads % tp:
        raise RunError(f"model.tensor_model_parallel_size={tp} must divide the model's {arch.num_heads} attention "
                       f"heads and {arch.num_kv_heads} KV heads")
    if launched:
        # What only a run inside the job checks: these imports bring in Megatron-core, which `plan` does without.
        from ..model.llama import DTYPES
        from ..parallel.groups import cuda_allocator_defaults

        device = torch.device("cpu")
        if cfg.trainer.accelerator == "gpu":
            cuda_allocator_defaults()  # before the first CUDA call below
            if not torch.cuda.is_available():
                raise RunError("trainer.accelerator=gpu but no CUDA device is visible; use trainer.accelerator=cpu")
            device = torch.device("cuda")
        try:  # a kernel that cannot run here is refused now, not after the weights are loaded
            resolve_backend(cfg.inference.attention_backend, device, DTYPES[cfg.model.precision])
        except ValueError as e:
            raise RunError(f"inference.attention_backend={cfg.inference.attention_backend}: {e}") from None
    ckpt.check_files()  # every weight file there, whole and readable: named here, on every rank, not mid-load
    return arch


def longest_request(cfg: RunConfig, arch: LlamaArch) -> Optional[Tuple[int, int]]:
    """(context, query) tokens of the input's longest valid request, for the memory planner."""
    tok = Tokenizer(open_checkpoint(cfg.checkpoint).tokenizer_dir, chat=cfg.inference.apply_chat_template)
    best = None
    for line_no, line in read_lines(cfg.inference.input_path):
        req = parse_request(line, line_no, tok, arch.vocab_size, arch.max_position_embeddings, cfg.inference)
        if req.error is None and (best is None or len(req.context_ids) + len(req.query_ids) > sum(best)):
            best = (len(req.context_ids), len(req.query_ids))
    return best
