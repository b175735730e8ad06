"""The two-phase engine: phase 1 encodes the context into the hosts' KV caches (star: blocks with their
anchor, no communication; ring: exact ring attention; none: one host), phase 2 runs the query and greedy
decoding with one collective per layer per step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import ANCHOR_MODES, PARTITIONS
from ..model.llama import StarLlama
from ..ops.attention import resolve_backend
from ..ops.layout import context_shares, ring_chunks, star_block_tokens, star_layout
from ..parallel.anchor import AnchorBroadcast
from ..parallel.context_parallel import broadcast_from_last
from ..parallel.groups import ParallelGroups
from .kv_cache import KVCache
from .requests import RequestError
from .steps import EncodeFirstBlock, EncodeRing, EncodeSegment, EncodeWithAnchor, QueryStep, SharedAnchor

Tensor = torch.Tensor


class NumericalError(RequestError):
    """NaN/Inf in a request's attention outputs or logits; reported in that request's output line."""


@dataclass(frozen=True)
class EngineSettings:
    mode: str  # star | ring | none
    block_size: int
    anchor_size: int
    tokens_to_generate: int
    attention_backend: str = "auto"
    eos_token_ids: Sequence[int] = ()
    anchor_mode: str = "shared"  # shared: block 0's host sends the anchor KV | recompute: every block re-encodes it
    partition: str = "uniform"  # uniform: blocks of block_size | balanced: block 0 is block_size + anchor_size


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
        if settings.anchor_mode not in ANCHOR_MODES or settings.partition not in PARTITIONS:
            raise ValueError(f"unknown anchor_mode {settings.anchor_mode!r} or partition {settings.partition!r}")
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
            self._prefill_star(context_ids, cache)
        elif s.mode == "ring":
            chunks = ring_chunks(len(context_ids), g.cp_size)
            a, b = chunks[g.cp_rank]
            pos = torch.cat([torch.arange(a.start, a.end), torch.arange(b.start, b.end)])
            step = EncodeRing(self.attn, cache, g.cp, chunks)
            if len(pos) == 0:
                self._run_without_tokens(step)  # a context shorter than the CP group: still relay KV
            else:
                m.runtime.step = step
                m.hidden(context_ids[pos], pos)
        else:
            raise ValueError(f"unknown context_parallel_mode {s.mode!r}")

    def context_share(self, n: int) -> int:
        """Context tokens of an ``n``-token context that this host keeps in its KV cache."""
        s, g = self.s, self.groups
        return context_shares(s.mode, n, g.cp_size, s.block_size, s.anchor_size, s.partition)[g.cp_rank]

    def _prefill_star(self, context_ids: Tensor, cache: KVCache) -> None:
        g, m, s = self.groups, self.model, self.s
        layout = star_layout(len(context_ids), s.block_size, s.anchor_size, s.partition, g.cp_size)
        n_anchor = min(s.anchor_size, len(layout[0][0]))
        needs_anchor = n_anchor > 0 and len(context_ids) > len(layout[0][0])
        if s.anchor_mode == "recompute" or not needs_anchor:
            for block in layout[g.cp_rank]:
                ids, pos, n_drop = star_block_tokens(context_ids, block, n_anchor)
                m.runtime.step = EncodeSegment(self.attn, cache, n_drop=n_drop)
                m.hidden(ids, pos)
            return
        exchange = None
        if g.cp_size > 1:
            tp = g.tp.size()
            shape = (1, m.arch.num_kv_heads // tp, n_anchor, m.arch.head_dim)
            exchange = AnchorBroadcast(g.cp, m.arch.num_layers, shape, m.dtype, g.device)
        anchor = SharedAnchor(m.arch.num_layers, exchange)
        if not layout[g.cp_rank] and g.cp_rank != 0:
            for layer in range(m.arch.num_layers):  # no blocks here, but every host takes part in the broadcast
                anchor.get(layer)
        for block in layout[g.cp_rank]:
            pos = torch.arange(block.start, block.end)
            if block.start == 0:
                m.runtime.step = EncodeFirstBlock(self.attn, cache, anchor, n_anchor)
            else:
                m.runtime.step = EncodeWithAnchor(self.attn, cache, anchor)
            m.hidden(context_ids[pos], pos)
        anchor.finish()

    def _run_without_tokens(self, step) -> None:
        """Drive ``step`` through every layer with zero local tokens, for hosts that only relay."""
        g, m = self.groups, self.model
        tp = g.tp.size()
        empty = lambda h: torch.empty(1, h // tp, 0, m.arch.head_dim, dtype=m.dtype, device=g.device)  # noqa: E731
        for layer in range(m.arch.num_layers):
            step(layer, empty(m.arch.num_heads), empty(m.arch.num_kv_heads), empty(m.arch.num_kv_heads), 1.0)

    def generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool = False,
                 tokens_to_generate: Optional[int] = None) -> Generation:
        """Greedy generation for one request. context_ids [L], query_ids [q] (int64, q >= 1);
        ``tokens_to_generate`` overrides the settings' budget for this request."""
        try:
            return self._generate(context_ids, query_ids, save_logits, tokens_to_generate)
        finally:
            self.model.runtime.step = None  # the last step holds this request's KV cache: free it now

    @torch.inference_mode()
    def _generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool,
                  tokens_to_generate: Optional[int]) -> Generation:
        g, m, s = self.groups, self.model, self.s
        budget = tokens_to_generate or s.tokens_to_generate
        held = self.context_share(len(context_ids)) + (len(query_ids) + budget if g.is_query_host else 0)
        cache = KVCache(m.arch.num_layers, reserve=held)
        n_layers = m.arch.num_layers
        m.runtime.reset_guard(g.device)
        t0 = time.perf_counter()
        self.prefill(context_ids, cache)
        self._sync()
        # One reduction over all ranks: the slowest host's phase-1 time (the critical path) and the first
        # layer, on any rank, whose attention output was not finite (encoded so that MAX finds the lowest).
        stats = torch.stack([torch.tensor(time.perf_counter() - t0, dtype=torch.float64, device=g.device),
                             (n_layers - m.runtime.first_nonfinite_layer()).to(torch.float64)])
        if dist.get_world_size() > 1:
            dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        phase1_s, bad = float(stats[0]), int(stats[1])
        if bad:
            raise NumericalError(f"non-finite values (NaN/Inf) in the attention output of layer {n_layers - bad} "
                                 "during phase 1 (context encoding)")

        t2 = time.perf_counter()
        m.runtime.step = QueryStep(self.attn, cache, g.cp, g.is_query_host)
        ids, start = query_ids, len(context_ids)
        out: List[int] = []
        first_logits = None
        # [next token, first non-finite layer (n_layers: none; n_layers + 1: only the logits)], decided by the query host
        decision = torch.zeros(2, dtype=torch.long, device=g.device)
        first_token_s = None
        while True:
            m.runtime.reset_guard(g.device)
            hidden = m.hidden(ids, torch.arange(start, start + len(ids)))
            if g.is_query_host:  # only the query host needs logits; the others learn the token below
                logits = m.logits(hidden[-1:])[0]
                if save_logits and first_logits is None:
                    first_logits = logits.cpu()
                decision[0] = torch.argmax(logits)
                bad = m.runtime.first_nonfinite_layer()
                decision[1] = torch.where(~torch.isfinite(logits).all() & (bad == n_layers), n_layers + 1, bad)
            broadcast_from_last(decision, g.cp)
            nxt, bad_layer = decision.tolist()
            if bad_layer < n_layers:
                raise NumericalError(f"non-finite values (NaN/Inf) in the attention output of layer {bad_layer} "
                                     f"during phase 2 (step {len(out)})")
            if bad_layer == n_layers + 1:
                raise NumericalError(f"non-finite logits during phase 2 (step {len(out)})")
            out.append(nxt)
            if first_token_s is None:
                first_token_s = time.perf_counter() - t2
            if len(out) >= budget or nxt in s.eos_token_ids:
                break
            start += len(ids)
            ids = decision[:1].clone()
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
