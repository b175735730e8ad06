"""The two-phase engine: phase 1 encodes the context into the hosts' KV caches (the mode's: star blocks with
their anchor, ring attention, or one host), phase 2 runs the query and greedy decoding with one collective per
layer per step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch
import torch.distributed as dist

from ..config import InferenceConfig
from ..model.llama import StarLlama
from ..ops.attention import resolve_backend
from ..ops.decode_attention import resolve_decode_kernel
from ..parallel.context_parallel import broadcast_from_last
from ..parallel.groups import ParallelGroups
from .decode import NumericalError, check_decision, decode_loop
from .kv_cache import KVCache
from .modes import context_parallel_mode
from .steps import QueryStep

Tensor = torch.Tensor
__all__ = ["ContextReuse", "EncodedContext", "Engine", "Generation", "NumericalError"]


@dataclass
class EncodedContext:
    """A context after phase 1 on this host: its KV cache (this host's share of the context) and the slowest
    host's phase-1 time. Phase 2 only appends after the share, so one encoding answers any number of queries:
    :meth:`Engine.answer` rolls the cache back to the share first."""

    context_ids: Tensor  # [L] int64, on the CPU: what the cache encodes
    cache: Optional[KVCache]
    share: int
    phase1_s: float
    room: int  # tokens the query host's cache holds room for past its share (the same number on every rank)

    def matches(self, context_ids: Tensor) -> bool:
        """Whether this encoding is of ``context_ids`` (the same token ids) and still held."""
        return (self.cache is not None and self.context_ids.shape == context_ids.shape
                and torch.equal(self.context_ids, context_ids.cpu()))

    def release(self) -> None:
        """Free the cache now, whoever still refers to this object."""
        self.cache = None


@dataclass
class Generation:
    """One request's result, the same on every rank except ``first_step_logits`` (query host only)."""

    generated_ids: List[int]
    timings: Dict[str, Optional[float]]
    first_step_logits: Optional[Tensor] = None
    context_reused: bool = False  # phase 1 was skipped: the previous request's context was the same


class Engine:
    """Runs requests on one host of a TP x CP world. ``inference`` is the config's section: the mode object,
    the attention kernels and the decode loop are chosen from it once, here."""

    def __init__(self, model: StarLlama, groups: ParallelGroups, inference: InferenceConfig,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.mode = context_parallel_mode(inference)
        self.mode.check(groups.cp_size)
        self.model, self.groups, self.inference = model, groups, inference
        self.eos_token_ids = tuple(eos_token_ids)
        self.attn = resolve_backend(inference.attention_backend, groups.device, model.dtype)
        self.decode_kernel = resolve_decode_kernel(groups.device)
        self.decoder = decode_loop(inference.decode)

    def _sync(self) -> None:
        if self.groups.device.type == "cuda":
            torch.cuda.synchronize(self.groups.device)

    def context_share(self, n: int) -> int:
        """Context tokens of an ``n``-token context that this host keeps in its KV cache."""
        return self.mode.context_shares(n, self.groups.cp_size)[self.groups.cp_rank]

    @torch.inference_mode()
    def prefill(self, context_ids: Tensor, cache: KVCache) -> None:
        """Phase 1: this host's share of the context into ``cache``."""
        self.mode.prefill(self, context_ids, cache)

    def run_without_tokens(self, step) -> None:
        """Drive ``step`` through every layer with zero local tokens, for hosts that only relay."""
        g, m = self.groups, self.model
        tp = g.tp.size()
        empty = lambda h: torch.empty(1, h // tp, 0, m.arch.head_dim, dtype=m.dtype, device=g.device)  # noqa: E731
        for layer in range(m.arch.num_layers):
            step(layer, empty(m.arch.num_heads), empty(m.arch.num_kv_heads), empty(m.arch.num_kv_heads), 1.0)

    def decide(self, hidden: Tensor, decision: Tensor) -> Optional[Tensor]:
        """The next token and the step's non-finite flags into ``decision`` [2] (int64, on the device): the
        query host computes them from ``hidden``'s last row and broadcasts them to the other hosts. flags: the
        first layer whose attention output was not finite, num_layers if none, num_layers + 1 if only the
        logits were not. Returns the query host's float32 logits [vocab] (None elsewhere). No host sync."""
        g, m = self.groups, self.model
        n_layers = m.arch.num_layers
        logits = None
        if g.is_query_host:  # only the query host needs logits; the others learn the token below
            logits = m.logits(hidden[-1:])[0]
            decision[0] = torch.argmax(logits)
            bad = m.runtime.first_nonfinite_layer()
            decision[1] = torch.where(~torch.isfinite(logits).all() & (bad == n_layers), n_layers + 1, bad)
        broadcast_from_last(decision, g.cp)
        return logits

    def generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool = False,
                 tokens_to_generate: Optional[int] = None) -> Generation:
        """Greedy generation for one request: phase 1, then phase 2. context_ids [L], query_ids [q] (int64,
        q >= 1); ``tokens_to_generate`` overrides the config's budget for this request."""
        budget = tokens_to_generate or self.inference.tokens_to_generate
        context = self.encode(context_ids, room=len(query_ids) + budget)
        gen = self.answer(context, query_ids, budget, save_logits)
        gen.timings = {"phase1_s": round(context.phase1_s, 6), **gen.timings}
        return gen

    def encode(self, context_ids: Tensor, room: int = 0) -> EncodedContext:
        """Phase 1 of ``context_ids`` [L] into a new cache sized for this host's share, plus ``room`` tokens on
        the query host (the query and the tokens to generate)."""
        g, m = self.groups, self.model
        share = self.context_share(len(context_ids))
        cache = KVCache(m.arch.num_layers, reserve=share + (room if g.is_query_host else 0))
        n_layers = m.arch.num_layers
        with torch.inference_mode():
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
        return EncodedContext(context_ids.cpu(), cache, share, phase1_s, room)

    @torch.inference_mode()
    def answer(self, context: EncodedContext, query_ids: Tensor, budget: int,
               save_logits: bool = False) -> Generation:
        """Phase 2 over an encoded context: the query pass (the first token), then the decode loop for up to
        ``budget - 1`` more. The query host's cache is first rolled back to the context (an earlier answer's
        query and tokens dropped) and given room for this one."""
        cache, context_len = context.cache, len(context.context_ids)
        cache.set_length(context.share)
        context.room = max(context.room, len(query_ids) + budget)
        if self.groups.is_query_host:
            cache.reserve(context.share + context.room)
        g, m = self.groups, self.model
        t0 = time.perf_counter()
        decision = torch.zeros(2, dtype=torch.long, device=g.device)
        with m.attending(QueryStep(self.attn, cache, g.cp, g.is_query_host)):
            m.runtime.reset_guard(g.device)
            hidden = m.hidden(query_ids, torch.arange(context_len, context_len + len(query_ids)))
            logits = self.decide(hidden, decision)
        first, bad = decision.tolist()
        check_decision(bad, m.arch.num_layers, step=0)
        first_token_s = time.perf_counter() - t0
        out = [first]
        if budget > 1 and first not in self.eos_token_ids:
            out += self.decoder.run(self, context, decision, context_len + len(query_ids), budget - 1)
        self._sync()
        phase2_s = time.perf_counter() - t0
        decode_s = phase2_s - first_token_s
        timings = {
            "phase2_s": round(phase2_s, 6),
            "first_token_s": round(first_token_s, 6),
            "decode_tokens_per_s": round((len(out) - 1) / decode_s, 3) if len(out) > 1 and decode_s > 0 else None,
        }
        return Generation(out, timings, logits.cpu() if save_logits and logits is not None else None)


class ContextReuse:
    """Requests in a row over the same context (the same token ids; the settings are the run's) share one
    phase 1: the first encodes it, the next ones start at phase 2 on the held caches. One context is held at a
    time: a request over another context releases it before its own phase 1, so memory never holds two."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.held: Optional[EncodedContext] = None

    def generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool = False) -> Generation:
        """As :meth:`Engine.generate`; ``phase1_s`` is 0 and ``context_reused`` true where phase 1 was skipped."""
        budget = self.engine.inference.tokens_to_generate
        reused = self.held is not None and self.held.matches(context_ids)
        if not reused:
            if self.held is not None:
                self.held.release()
            self.held = None
            self.held = self.engine.encode(context_ids, room=len(query_ids) + budget)
        gen = self.engine.answer(self.held, query_ids, budget, save_logits)
        gen.timings = {"phase1_s": 0.0 if reused else round(self.held.phase1_s, 6), **gen.timings}
        gen.context_reused = reused
        return gen
