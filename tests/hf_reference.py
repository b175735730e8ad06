"""Independent references built on HF transformers' LlamaForCausalLM (fp32): global attention, and the
star algorithm done by hand on HF's own KV cache (blocks with anchor, anchor KV dropped)."""

from __future__ import annotations

from functools import lru_cache
from typing import List, Optional, Tuple

import torch
from transformers import DynamicCache, LlamaForCausalLM


@lru_cache(maxsize=None)
def load_hf(path: str) -> LlamaForCausalLM:
    return LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _kv(out) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    return [(layer.keys, layer.values) for layer in out.past_key_values.layers]


@torch.no_grad()
def _decode(hf, kv, qry: List[int], start: int, n: int) -> Tuple[List[int], torch.Tensor]:
    cache = DynamicCache()
    for i, (k, v) in enumerate(kv):
        cache.update(k, v, i)
    ids, tokens, first = torch.tensor([qry]), [], None
    for _ in range(n):
        pos = torch.arange(start, start + ids.shape[1])[None]
        logits = hf(ids, position_ids=pos, past_key_values=cache, use_cache=True).logits[0, -1]
        first = logits if first is None else first
        tokens.append(int(logits.argmax()))
        start += ids.shape[1]
        ids = torch.tensor([[tokens[-1]]])
    return tokens, first


@torch.no_grad()
def global_generate(path: str, ctx: List[int], qry: List[int], n: int) -> Tuple[List[int], torch.Tensor]:
    """Greedy tokens and first-step logits with exact global attention."""
    hf = load_hf(path)
    out = hf(torch.tensor([ctx]), use_cache=True)
    return _decode(hf, _kv(out), qry, len(ctx), n)


def _block_starts(n: int, block: int, first_block: Optional[int]) -> List[int]:
    return [0] + list(range(first_block or block, n, block))


def _landmarks(start: int, anchor: int, count: int, size: int) -> List[int]:
    """Positions of the landmark tokens before a block at ``start``: the stretch after the anchor cut into
    ``count`` equal parts, the last ``size`` tokens of each (all of it where that would cover it)."""
    lo = min(anchor, start)
    if start - lo <= count * size:
        return list(range(lo, start))
    out = []
    for i in range(count):
        end = lo + (i + 1) * (start - lo) // count
        out += list(range(end - size, end))
    return out


@torch.no_grad()
def star_kv(path: str, ctx: List[int], block: int, anchor: int, first_block: Optional[int] = None,
            landmarks: Optional[Tuple[int, int]] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """Star Attention's phase 1 by hand, per layer the kept (k, v) [1, hk, L, d]: block k >= 1 encoded as
    anchor ++ block with positions [0..a) ++ block's own (a = min(anchor, block start): an anchor longer than a
    block stops at the block), the anchor's KV dropped. ``first_block`` sizes block 0 (the balanced partition);
    ``landmarks`` = (count, size): each block k >= 1 also re-encodes those chunks of the tokens between the
    anchor and itself, between the two, their KV dropped too."""
    hf = load_hf(path)
    parts = []
    starts = _block_starts(len(ctx), block, first_block)
    for s, e in zip(starts, starts[1:] + [len(ctx)]):
        prefix = list(range(min(anchor, s)))
        if landmarks and s > 0:
            prefix += _landmarks(s, anchor, *landmarks)
        pos = prefix + list(range(s, e))
        out = hf(torch.tensor([[ctx[p] for p in pos]]), position_ids=torch.tensor([pos]), use_cache=True)
        parts.append([(k[:, :, len(prefix):], v[:, :, len(prefix):]) for k, v in _kv(out)])
    return [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
            for i in range(len(parts[0]))]


def star_generate(path: str, ctx: List[int], qry: List[int], n: int, block: int, anchor: int,
                  first_block: Optional[int] = None,
                  landmarks: Optional[Tuple[int, int]] = None) -> Tuple[List[int], torch.Tensor]:
    """:func:`star_kv`, then the query attends to all kept KV and causally to itself."""
    kv = star_kv(path, ctx, block, anchor, first_block, landmarks)
    return _decode(load_hf(path), kv, qry, len(ctx), n)


@torch.no_grad()
def star_previous_kv(path: str, ctx: List[int], block: int, anchor: int,
                     first_block: Optional[int] = None) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """``anchor+previous``'s phase 1 by hand, block after block: block k >= 1 runs with HF's cache holding the
    anchor's KV (block 0's first a tokens) and the KV kept for block k-1 past the anchor, so it sees those fully
    and itself causally; its own KV is kept. Per layer (k, v) [1, hk, L, d]."""
    hf = load_hf(path)
    kept = []  # per block: per layer (k, v) of its tokens
    starts = _block_starts(len(ctx), block, first_block)
    for j, (s, e) in enumerate(zip(starts, starts[1:] + [len(ctx)])):
        cache = DynamicCache()
        if j > 0:
            a, skip = min(anchor, s), max(0, anchor - starts[j - 1])
            for i, ((ka, va), (kp, vp)) in enumerate(zip(kept[0], kept[j - 1])):
                cache.update(torch.cat([ka[:, :, :a], kp[:, :, skip:]], 2),
                             torch.cat([va[:, :, :a], vp[:, :, skip:]], 2), i)
        past = cache.get_seq_length()
        out = hf(torch.tensor([ctx[s:e]]), position_ids=torch.tensor([list(range(s, e))]), past_key_values=cache,
                 use_cache=True)
        kept.append([(k[:, :, past:], v[:, :, past:]) for k, v in _kv(out)])
    return [(torch.cat([p[i][0] for p in kept], 2), torch.cat([p[i][1] for p in kept], 2)) for i in range(len(kept[0]))]


def star_previous_generate(path: str, ctx: List[int], qry: List[int], n: int, block: int, anchor: int,
                           first_block: Optional[int] = None) -> Tuple[List[int], torch.Tensor]:
    """:func:`star_previous_kv`, then the query as in :func:`star_generate`."""
    kv = star_previous_kv(path, ctx, block, anchor, first_block)
    return _decode(load_hf(path), kv, qry, len(ctx), n)
