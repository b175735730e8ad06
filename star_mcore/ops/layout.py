"""Where each context token goes: star blocks (with their anchor) and ring's load-balanced chunks.

Pure index arithmetic on context length L; no tensors of the model, no process groups.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch


@dataclass(frozen=True)
class Span:
    """Half-open token range [start, end) of the context."""

    start: int
    end: int

    def __len__(self) -> int:
        return self.end - self.start


def even_split(n: int, parts: int) -> List[int]:
    """Sizes of ``parts`` contiguous pieces of ``n`` items, earlier pieces one larger where it does not divide."""
    base, extra = divmod(n, parts)
    return [base + (1 if i < extra else 0) for i in range(parts)]


def star_blocks(context_len: int, block_size: int, cp_size: int,
                first_block_size: Optional[int] = None) -> List[List[Span]]:
    """Cut the context into blocks of ``block_size`` (the last may be shorter) and spread them
    contiguously over ``cp_size`` hosts. Returns the blocks of each host (possibly none).

    ``first_block_size`` (default ``block_size``) sizes block 0 alone: the balanced partition gives it
    ``block_size + anchor_size`` tokens, since its host encodes no anchor.
    """
    first = block_size if first_block_size is None else first_block_size
    if block_size <= 0 or first <= 0:
        raise ValueError("block sizes must be positive")
    starts = [0] + list(range(first, context_len, block_size))
    blocks = [Span(s, min(e, context_len)) for s, e in zip(starts, starts[1:] + [context_len]) if s < context_len]
    out, i = [], 0
    for count in even_split(len(blocks), cp_size):
        out.append(blocks[i:i + count])
        i += count
    return out


def star_layout(context_len: int, block_size: int, anchor_size: int, partition: str, cp_size: int) -> List[List[Span]]:
    """:func:`star_blocks` for a partition: ``uniform`` (every block ``block_size``) or ``balanced`` (block 0
    also takes ``anchor_size`` tokens, since its host encodes no anchor)."""
    first = block_size + (anchor_size if partition == "balanced" else 0)
    return star_blocks(context_len, block_size, cp_size, first_block_size=first)


def landmark_spans(start: int, anchor_size: int, count: int, size: int) -> List[Span]:
    """The landmarks of a block starting at ``start``: ``count`` chunks of ``size`` tokens of the stretch
    ``c[a:start]`` the anchor leaves out, each ending at one of ``count`` evenly spaced points of it (the last at
    the block's start); the whole stretch where the chunks would cover it."""
    lo = min(anchor_size, start)
    gap = start - lo
    if gap <= count * size:
        return [Span(lo, start)] if gap else []
    return [Span(e - size, e) for e in (lo + (i + 1) * gap // count for i in range(count))]


def star_block_tokens(context_ids: torch.Tensor, block: Span, anchor_size: int,
                      landmarks: Sequence[Span] = ()) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """Token ids, position ids and prefix length of one phase-1 star segment.

    Block 0 is encoded alone. Block k >= 1 is ``c[0:a'] ++ c[landmarks] ++ c[block]`` with each token at its own
    position, ``a' = min(anchor_size, block.start)``; the prefix's outputs (its KV) are dropped.
    """
    prefix = [Span(0, min(anchor_size, block.start))] + (list(landmarks) if block.start else [])
    pos = torch.cat([torch.arange(s.start, s.end) for s in prefix] + [torch.arange(block.start, block.end)])
    return context_ids[pos], pos, len(pos) - len(block)


def ring_chunks(context_len: int, cp_size: int) -> List[Tuple[Span, Span]]:
    """Load-balanced ("zigzag") causal layout: 2P near-equal chunks, host r takes chunks r and 2P-1-r,
    so every host has the same amount of causal attention work."""
    bounds = [0]
    for size in even_split(context_len, 2 * cp_size):
        bounds.append(bounds[-1] + size)
    chunks = [Span(bounds[i], bounds[i + 1]) for i in range(2 * cp_size)]
    return [(chunks[r], chunks[2 * cp_size - 1 - r]) for r in range(cp_size)]


def ring_chunk_ids(rank: int, cp_size: int) -> Tuple[int, int]:
    """Global chunk indices of host ``rank``'s two ring chunks (their causal order)."""
    return rank, 2 * cp_size - 1 - rank
