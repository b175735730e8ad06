"""The two-phase engine: phase 1 encodes the context into the hosts' KV caches (star: blocks with their
anchor, no communication; ring: exact ring attention; none: one host), phase 2 runs the query and greedy
decoding with one collective per layer per step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..model.llama import StarLlama
from ..ops.attention import resolve_backend
from ..ops.layout import ring_chunks, star_block_tokens, star_blocks
from ..parallel.context_parallel import broadcast_from_last
from ..parallel.groups import ParallelGroups
from .kv_cache import KVCache
from .steps import EncodeRing, EncodeSegment, QueryStep

Tensor = torch.Tensor


@dataclass(frozen=True)
class EngineSettings:
    mode: str  # star | ring | none
    block_size: int
    anchor_size: int
    tokens_to_generate: int
    attention_backend: str = "auto"
    eos_token_ids: Sequence[int] = ()


@dataclass
class Generation:
    """One request's result, the same on every rank except ``first_step_logits`` (query host only)."""

    generated_ids: List[int]
    timings: Dict[str, Optional[float]]
    first_step_logits: Optional[Tensor] = None


class Engine:
    def __init__(self, model: StarLlama, groups: ParallelGroups, settings: EngineSettings) -> None:
        if settings.mode == "none" and groups.cp_size != 1:
            raise ValueError("context_parallel_mode=none needs context_parallel_size=1")
        self.model, self.groups, self.s = model, groups, settings
        self.attn = resolve_backend(settings.attention_backend, groups.device, model.dtype)

    def _sync(self) -> None:
        if self.groups.device.type == "cuda":
            torch.cuda.synchronize(self.groups.device)

    @torch.inference_mode()
    def prefill(self, context_ids: Tensor, cache: KVCache) -> None:
        """Phase 1: this host's share of the context into ``cache``."""
        g, m, s = self.groups, self.model, self.s
        if s.mode == "none":
            m.runtime.step = EncodeSegment(self.attn, cache)
            m.hidden(context_ids, torch.arange(len(context_ids)))
        elif s.mode == "star":
            for block in star_blocks(len(context_ids), s.block_size, g.cp_size)[g.cp_rank]:
                ids, pos, n_anchor = star_block_tokens(context_ids, block, s.anchor_size)
                m.runtime.step = EncodeSegment(self.attn, cache, n_drop=n_anchor)
                m.hidden(ids, pos)
        elif s.mode == "ring":
            chunks = ring_chunks(len(context_ids), g.cp_size)
            a, b = chunks[g.cp_rank]
            pos = torch.cat([torch.arange(a.start, a.end), torch.arange(b.start, b.end)])
            step = EncodeRing(self.attn, cache, g.cp, chunks)
            if len(pos) == 0:
                # A context shorter than the CP group leaves this host no tokens; it still relays KV.
                tp = g.tp.size()
                empty = lambda h: torch.empty(1, h // tp, 0, m.arch.head_dim, dtype=m.dtype, device=g.device)  # noqa: E731
                for layer in range(m.arch.num_layers):
                    step(layer, empty(m.arch.num_heads), empty(m.arch.num_kv_heads), empty(m.arch.num_kv_heads), 1.0)
            else:
                m.runtime.step = step
                m.hidden(context_ids[pos], pos)
        else:
            raise ValueError(f"unknown context_parallel_mode {s.mode!r}")

    @torch.inference_mode()
    def generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool = False,
                 tokens_to_generate: Optional[int] = None) -> Generation:
        """Greedy generation for one request. context_ids [L], query_ids [q] (int64, q >= 1);
        ``tokens_to_generate`` overrides the settings' budget for this request."""
        g, m, s = self.groups, self.model, self.s
        budget = tokens_to_generate or s.tokens_to_generate
        cache = KVCache(m.arch.num_layers)
        t0 = time.perf_counter()
        self.prefill(context_ids, cache)
        self._sync()
        # The critical path of phase 1 is the slowest host.
        t1 = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=g.device)
        if g.cp_size > 1:
            dist.all_reduce(t1, op=dist.ReduceOp.MAX, group=g.cp)
        phase1_s = float(t1.item())

        t2 = time.perf_counter()
        m.runtime.step = QueryStep(self.attn, cache, g.cp, g.is_query_host)
        ids, start = query_ids, len(context_ids)
        out: List[int] = []
        first_logits = None
        token = torch.zeros(1, dtype=torch.long, device=g.device)
        first_token_s = None
        while True:
            hidden = m.hidden(ids, torch.arange(start, start + len(ids)))
            if g.is_query_host:  # only the query host needs logits; the others learn the token below
                logits = m.logits(hidden[-1:])[0]
                if save_logits and first_logits is None:
                    first_logits = logits.cpu()
                token[0] = torch.argmax(logits)
            broadcast_from_last(token, g.cp)
            nxt = int(token.item())
            out.append(nxt)
            if first_token_s is None:
                first_token_s = time.perf_counter() - t2
            if len(out) >= budget or nxt in s.eos_token_ids:
                break
            start += len(ids)
            ids = token.clone()
        self._sync()
        phase2_s = time.perf_counter() - t2
        decode_s = phase2_s - first_token_s
        timings = {
            "phase1_s": round(phase1_s, 6),
            "phase2_s": round(phase2_s, 6),
            "first_token_s": round(first_token_s, 6),
            "decode_tokens_per_s": round((len(out) - 1) / decode_s, 3) if len(out) > 1 and decode_s > 0 else None,
        }
        return Generation(out, timings, first_logits)
