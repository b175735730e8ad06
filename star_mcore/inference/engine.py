"""The two-phase engine of one rank: phase 1 encodes a context into this host's KV sequence (the mode's: star
blocks with their anchor, ring attention, or one host), phase 2 runs a request's query pass and then the decode
steps of the whole running batch (:mod:`.batch`), with one collective per layer per step."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import InferenceConfig
from ..model.llama import StarLlama
from ..ops.attention import resolve_backend
from ..ops.sampling import SamplerWork, SamplingParams
from ..parallel.groups import ParallelGroups, reduce_max
from .decode import decode_loop
from .host import Host
from .kv_cache import KVPool, KVSequence
from .modes import context_parallel_mode
from .steps import QueryStep
from .verdict import Choice, NumericalError, decide, width

Tensor = torch.Tensor
__all__ = ["Encoded", "Engine", "Generation", "NumericalError", "Sampling"]


@dataclass(frozen=True)
class Sampling:
    """One request's generation settings (the config's ``inference.sampling`` and ``tokens_to_generate``,
    overridden by the request's own fields)."""

    tokens_to_generate: int = 32
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: no limit
    top_p: float = 1.0
    seed: int = 0
    stop_token_ids: Tuple[int, ...] = ()
    logprobs: int = 0  # top log-probs per generated token (0: none; the chosen token's when > 0)


@dataclass
class Encoded:
    """A context after phase 1 on this host: its share of the context's KV and the slowest host's phase-1
    time. Any number of requests read it; only the query host's requests append, to sequences of their own."""

    context_ids: Tensor  # [L] int64, on the CPU
    seq: KVSequence
    phase1_s: float


@dataclass
class Generation:
    """One request's result, the same on every rank except ``first_step_logits`` (query host only)."""

    generated_ids: List[int]
    finish_reason: str  # eos | stop | length
    timings: Dict[str, Optional[float]]
    first_step_logits: Optional[Tensor] = None
    context_reused: bool = False  # phase 1 was skipped: the context was already encoded for another request
    logprobs: Optional[List[Dict[str, Any]]] = None  # per generated token: {"id", "logprob", "top": [[id, lp]]}


class Engine:
    """Runs requests on one host of a TP x CP world. ``inference`` is the config's section: the mode object,
    the attention kernel, the decode loop and the batch size are chosen from it once, here. The KV pool is
    sized by :meth:`reserve` (the batch does it from the requests it is given)."""

    def __init__(self, model: StarLlama, groups: ParallelGroups, inference: InferenceConfig,
                 eos_token_ids: Sequence[int] = ()) -> None:
        self.mode = context_parallel_mode(inference)
        self.mode.check(groups.cp_size)
        self.inference = inference
        self.eos_token_ids = tuple(eos_token_ids)
        self.host = Host(model, groups, resolve_backend(inference.attention_backend, groups.device, model.dtype))
        self.decoder = decode_loop(inference.decode, self.host, inference.max_batch_size)
        self.pool: Optional[KVPool] = None

    @property
    def model(self) -> StarLlama:
        return self.host.model

    @property
    def groups(self) -> ParallelGroups:
        return self.host.groups

    def sync(self) -> None:
        """Wait for this rank's device work (timings are of finished work)."""
        if self.groups.device.type == "cuda":
            torch.cuda.synchronize(self.groups.device)

    def context_shares(self, n: int) -> List[int]:
        """Context tokens of an ``n``-token context that each host keeps."""
        return self.mode.context_shares(n, self.groups.cp_size)

    def context_share(self, n: int) -> int:
        return self.context_shares(n)[self.groups.cp_rank]

    def reserve(self, pages: int) -> KVPool:
        """A pool of at least ``pages`` pages (the same number on every rank). A smaller pool is replaced, which
        is only allowed while none of its pages is in use."""
        if self.pool is None or self.pool.pages < pages:
            if self.pool is not None and self.pool.free_pages != self.pool.pages - 1:
                raise RuntimeError("the KV pool cannot grow while sequences hold pages of it")
            m, tp = self.model, self.groups.tp.size()
            self.pool = None  # the old pool's memory goes before the new one is allocated
            self.pool = KVPool(m.arch.num_layers, pages, self.inference.kv_page_size, m.arch.num_kv_heads // tp,
                               m.arch.head_dim, m.dtype, self.groups.device)
        return self.pool

    @torch.inference_mode()
    def prefill(self, context_ids: Tensor, seq: KVSequence) -> None:
        """Phase 1: this host's share of the context into ``seq`` (the non-finite guard restarts here)."""
        self.model.runtime.reset_guard(self.groups.device)
        self.mode.prefill(self.host, context_ids, seq)

    def encode(self, context_ids: Tensor) -> Encoded:
        """Phase 1 of ``context_ids`` [L] into a new sequence of the pool. Raises NumericalError (on every
        rank) for a context whose attention output is not finite; the sequence is then released."""
        g, m = self.groups, self.model
        seq = self.pool.allocate(self.context_share(len(context_ids)))
        n_layers = m.arch.num_layers
        with torch.inference_mode():
            t0 = time.perf_counter()
            self.prefill(context_ids, seq)
            self.sync()
            # One reduction over all ranks: the slowest host's phase-1 time (the critical path) and the first
            # layer, on any rank, whose attention output was not finite (encoded so that MAX finds the lowest).
            phase1_s, bad = reduce_max([time.perf_counter() - t0,
                                        float(n_layers - m.runtime.first_nonfinite_layer()[0])], g.device)
        bad = int(bad)
        if bad:
            self.pool.release(seq)
            raise NumericalError(f"non-finite values (NaN/Inf) in the attention output of layer {n_layers - bad} "
                                 "during phase 1 (context encoding)")
        return Encoded(context_ids.cpu(), seq, phase1_s)

    @torch.inference_mode()
    def query(self, context: Encoded, own: Optional[KVSequence], query_ids: Tensor,
              sampling: Sampling) -> Tuple[Choice, Optional[Tensor]]:
        """The query pass of one request over an encoded context: the query's K, V into ``own`` (query host;
        None elsewhere) and the first token's verdict, with the query host's logits."""
        g, m = self.groups, self.model
        start = len(context.context_ids)
        params = SamplingParams.allocate(1, g.device)
        params.fill([sampling])
        verdict = torch.zeros(1, width(m.arch.vocab_size), dtype=torch.float64, device=g.device)
        with m.attending(QueryStep(self.host.attn, context.seq, own, g.cp)):
            m.runtime.reset_guard(g.device)
            hidden = m.hidden(query_ids, torch.arange(start, start + len(query_ids)))
        logits = decide(self.host, hidden[-1:], params, SamplerWork.of([sampling]), verdict)
        return Choice.read(verdict[0].tolist(), m.arch.num_layers, step=0), logits

    def generate(self, context_ids: Tensor, query_ids: Tensor, save_logits: bool = False,
                 tokens_to_generate: Optional[int] = None, sampling: Optional[Sampling] = None) -> Generation:
        """One request alone (a batch of one): phase 1, then phase 2. context_ids [L], query_ids [q] (int64,
        q >= 1). Raises NumericalError where its result would be an error."""
        from .batch import ContinuousBatch, Job

        sampling = sampling or Sampling(tokens_to_generate or self.inference.tokens_to_generate)
        results: List[Any] = []
        job = Job(context_ids, query_ids, sampling, save_logits=save_logits)
        ContinuousBatch(self).run([job], lambda j, r: results.append(r))
        if isinstance(results[0], Exception):
            raise results[0]
        return results[0]
