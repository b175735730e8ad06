"""Collectives of the tensor-parallel group that mcore's own helpers only do on CUDA."""

from __future__ import annotations

import torch
import torch.distributed as dist

from .context_parallel import all_gather_single


def gather_vocab_shards(logits: torch.Tensor, group: dist.ProcessGroup) -> torch.Tensor:
    """[s, vocab / tp] on each TP rank -> [s, vocab] on every TP rank (shards in rank order)."""
    size = group.size()
    if size == 1:
        return logits
    logits = logits.contiguous()
    out = logits.new_empty((size * logits.shape[0],) + logits.shape[1:])
    all_gather_single(out, logits, group=group)
    return torch.cat(out.chunk(size, dim=0), dim=-1)
