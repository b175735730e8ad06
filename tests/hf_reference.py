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


@torch.no_grad()
def star_generate(path: str, ctx: List[int], qry: List[int], n: int, block: int, anchor: int,
                  first_block: Optional[int] = None) -> Tuple[List[int], torch.Tensor]:
    """Star Attention by hand: block k >= 1 encoded as anchor ++ block with positions [0..a) ++ block's own,
    the anchor's KV dropped; then the query attends to all kept KV and causally to itself.
    ``first_block`` sizes block 0 (the balanced partition)."""
    hf = load_hf(path)
    parts = []
    first = first_block or block
    starts = [0] + list(range(first, len(ctx), block))
    for s, e in zip(starts, starts[1:] + [len(ctx)]):
        blk = ctx[s:e]
        a = anchor if s > 0 else 0
        ids = ctx[:a] + blk
        pos = list(range(a)) + list(range(s, s + len(blk)))
        out = hf(torch.tensor([ids]), position_ids=torch.tensor([pos]), use_cache=True)
        parts.append([(k[:, :, a:], v[:, :, a:]) for k, v in _kv(out)])
    kv = [(torch.cat([p[i][0] for p in parts], 2), torch.cat([p[i][1] for p in parts], 2))
          for i in range(len(parts[0]))]
    return _decode(hf, kv, qry, len(ctx), n)
