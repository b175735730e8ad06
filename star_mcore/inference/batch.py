"""Continuous batching: requests are admitted in order while a slot is free and their KV fits in every host's
pool; the running ones decode together, one token each per step; a finished one (EOS, a stop token or string,
its budget) leaves its slot to the next request, whose phase 1 and query pass run while the others keep their
state. Requests over the same context share one phase 1 and one copy of its KV (the decode step reads it once
for all of them); an encoded context stays resident after its requests end, until its pages are needed.

Every rank makes the same decisions from the same inputs: the requests, the page counts of every host (known
from the mode's shares, the same on every rank) and the verdicts the query host broadcasts.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from ..parallel.groups import reduce_max
from .decode import DecodeRow, Launched
from .engine import Encoded, Engine, Generation, Sampling
from .kv_cache import KVSequence
from .planner import context_pages, pool_pages
from .requests import RequestError
from .verdict import Choice, NumericalError

Tensor = torch.Tensor
Outcome = Union[Generation, RequestError]
_ADMISSIONS = itertools.count()


@dataclass
class Job:
    """One request for the batch."""

    context_ids: Tensor  # [L] int64
    query_ids: Tensor  # [q] int64, q >= 1
    sampling: Sampling
    save_logits: bool = False
    stopped: Optional[Callable[[List[int]], bool]] = None  # stop strings: do the tokens so far end the answer?
    tag: Any = None  # the caller's handle, passed back with the outcome

    @property
    def own_tokens(self) -> int:
        """KV the request appends on the query host: its query and the tokens it feeds back."""
        return len(self.query_ids) + self.sampling.tokens_to_generate

    @property
    def context_key(self) -> bytes:
        """Jobs with equal keys share one encoded context."""
        return self.context_ids.numpy().tobytes()

    @property
    def footprint(self) -> Tuple[bytes, int, int]:
        """What the planner counts of it (:func:`.planner.pool_pages`): (context key, context tokens, own
        tokens)."""
        return self.context_key, len(self.context_ids), self.own_tokens


@dataclass
class _Held:
    """An encoded context and its pages on every host."""

    encoded: Encoded
    pages: List[int]
    users: int = 0
    last_used: int = 0  # the admission number of its latest request (least recently used goes first)


@dataclass
class _Running:
    job: Job
    held: _Held
    own: Optional[KVSequence]
    own_pages: int
    reused: bool
    phase1_s: float
    t_query: float  # when its phase 2 started
    number: int  # its admission's number (unique in the process: decode loops key their device state on it)
    first_token_s: float = 0.0
    tokens: List[int] = field(default_factory=list)
    logprobs: List[Dict[str, Any]] = field(default_factory=list)
    logits: Optional[Tensor] = None


class ContinuousBatch:
    """Runs jobs through ``engine`` with at most ``inference.max_batch_size`` decoding together.

    Two ways to drive it, one loop underneath: :meth:`run` answers a list or stream of jobs to the end
    (``generate``, ``eval``); a server calls :meth:`open`, then :meth:`offer`, :meth:`cancel` and :meth:`step`
    as requests come and go, and :meth:`close`. ``max_resident_tokens``: contexts nobody uses are evicted, least
    recently used first, while all held contexts exceed it (None: only when their pages are needed).
    ``on_token(job, token, logprob)``: called for every token a request gets, as it gets it (streaming)."""

    def __init__(self, engine: Engine, max_resident_tokens: Optional[int] = None,
                 on_token: Optional[Callable[[Job, int, Optional[Dict[str, Any]]], None]] = None) -> None:
        self.engine = engine
        self.max_resident_tokens = max_resident_tokens
        self.on_token = on_token
        self.slots: List[Optional[_Running]] = [None] * engine.inference.max_batch_size
        self.contexts: Dict[bytes, _Held] = {}
        self.free: List[int] = []  # free pages of every host's pool (the same bookkeeping on every rank)
        self.in_flight: Optional[Launched] = None  # a launched step not yet read (pipelined decode loops)

    # --- pages -----------------------------------------------------------------------------------------------
    def _context_pages(self, job: Job) -> List[int]:
        eng = self.engine
        return context_pages(eng.mode, eng.groups.cp_size, eng.inference.kv_page_size, len(job.context_ids))

    def _need(self, job: Job, key: bytes) -> List[int]:
        cp = self.engine.groups.cp_size
        need = [0] * cp if key in self.contexts else self._context_pages(job)
        need[cp - 1] += self.engine.pool.pages_for(job.own_tokens)
        return need

    def _fits(self, need: List[int]) -> bool:
        return all(n <= f for n, f in zip(need, self.free))

    def _make_room(self, need: List[int], keep: bytes) -> bool:
        """Evict resident contexts nobody uses, least recently used first, until ``need`` fits."""
        idle = sorted((h.last_used, k) for k, h in self.contexts.items() if h.users == 0 and k != keep)
        for _, k in idle:
            if self._fits(need):
                break
            self._drop(k)
        return self._fits(need)

    def _trim(self) -> None:
        """Evict idle contexts, least recently used first, while the held ones exceed ``max_resident_tokens``."""
        if self.max_resident_tokens is None:
            return
        held = sum(len(h.encoded.context_ids) for h in self.contexts.values())
        for _, k in sorted((h.last_used, k) for k, h in self.contexts.items() if h.users == 0):
            if held <= self.max_resident_tokens:
                break
            held -= len(self.contexts[k].encoded.context_ids)
            self._drop(k)

    def _drop(self, key: bytes) -> None:
        held = self.contexts.pop(key)
        self.engine.pool.release(held.encoded.seq)
        self.free = [f + p for f, p in zip(self.free, held.pages)]

    # --- the loop --------------------------------------------------------------------------------------------
    @property
    def busy(self) -> bool:
        """Some request is decoding."""
        return any(self.slots)

    @torch.inference_mode()  # as before the split: the pool is made where it is used
    def open(self, pages: int) -> None:
        """Take a pool of ``pages`` pages per host (the same on every rank); nothing is held yet."""
        pool = self.engine.reserve(pages)
        self.free = [pool.pages - 1] * self.engine.groups.cp_size

    def close(self) -> None:
        """Release every held context (no request may be running; a step still in flight holds only ended
        requests' rows)."""
        self.in_flight = None
        for key in list(self.contexts):
            self._drop(key)

    @torch.inference_mode()
    def offer(self, job: Job, emit: Callable[[Job, Outcome], None]) -> bool:
        """Admit ``job`` if a slot is free and its pages fit (evicting idle contexts for them): its phase 1 (unless
        its context is held) and query pass run now. False: not now, offer it again after a step. A job that can
        never fit, or whose phase 1 fails, is emitted as its error (True: it is dealt with)."""
        if None not in self.slots:
            return False
        key = job.context_key
        need = self._need(job, key)
        if not self._fits(need) and not self._make_room(need, keep=key):
            if self.busy:
                return False  # wait for a running request to leave its pages
            emit(job, RequestError(f"needs {max(need)} KV pages of {self.engine.inference.kv_page_size} tokens on "
                                   f"one host, more than the pool's {self.engine.pool.pages - 1}"))
            return True
        self._admit(job, key, emit)
        return True

    def cancel(self, tag: Any) -> bool:
        """End the running request whose job has ``tag`` without a result (its client left); False if none."""
        for i, r in enumerate(self.slots):
            if r is not None and r.job.tag == tag:
                self._leave(r)
                self.slots[i] = None
                return True
        return False

    def run(self, jobs: Iterable[Job], emit: Callable[[Job, Outcome], None], pages: Optional[int] = None,
            stop: Optional[Callable[[], bool]] = None) -> bool:
        """Answer ``jobs`` in order of admission, calling ``emit`` as each one ends (a Generation, or the
        RequestError that ended it). ``pages``: each host's pool size (default: what the jobs, which must then
        be a list, need at once; :func:`.planner.kv_pool_pages` caps it by memory). ``stop``: asked (on every
        rank, agreed over all) before each admission; once it says so on any rank no request is admitted and the
        running ones finish. Returns False if jobs were left unstarted so. Every held context is released at
        the end."""
        if pages is None:
            jobs = list(jobs)
            eng = self.engine
            pages = pool_pages(eng.mode, eng.groups.cp_size, eng.inference.kv_page_size, len(self.slots),
                               [j.footprint for j in jobs])
        self.open(pages)
        pending = iter(jobs)
        nxt = next(pending, None)
        try:
            while nxt is not None or self.busy:
                while nxt is not None and None in self.slots:
                    # every rank asks at the same point of the loop: a stop on any rank stops all
                    if stop is not None and reduce_max([float(stop())], self.engine.groups.device)[0]:
                        while self.busy:  # the running ones finish; nothing new starts
                            self.step(emit)
                        return False
                    if not self.offer(nxt, emit):
                        break
                    nxt = next(pending, None)
                if self.busy:
                    self.step(emit)
            return True
        finally:
            self.close()

    def _admit(self, job: Job, key: bytes, emit: Callable[[Job, Outcome], None]) -> None:
        eng, g = self.engine, self.engine.groups
        number = next(_ADMISSIONS)
        held = self.contexts.get(key)
        reused = held is not None
        if held is None:
            try:
                encoded = eng.encode(job.context_ids)
            except NumericalError as e:
                emit(job, e)
                return
            held = _Held(encoded, self._context_pages(job))
            self.contexts[key] = held
            self.free = [f - p for f, p in zip(self.free, held.pages)]
        held.users += 1
        held.last_used = number
        own_pages = eng.pool.pages_for(job.own_tokens)
        self.free[-1] -= own_pages
        own = eng.pool.allocate(job.own_tokens) if g.is_query_host else None
        r = _Running(job, held, own, own_pages, reused, 0.0 if reused else held.encoded.phase1_s, time.perf_counter(),
                     number)
        choice, logits = eng.query(held.encoded, own, job.query_ids.to(g.device), job.sampling)
        eng.sync()
        r.first_token_s = time.perf_counter() - r.t_query
        if job.save_logits and logits is not None:
            r.logits = logits[0].cpu()
        if not self._accept(r, choice, emit):
            self.slots[self.slots.index(None)] = r

    @torch.inference_mode()
    def step(self, emit: Callable[[Job, Outcome], None]) -> None:
        """One token for every running request; those that end are emitted and leave their slots. Pipelined
        decode loops: the step is launched and the one before it read (the host's reading overlaps the device's
        next step; a row of a request that has ended since is dropped); eager: this one is read."""
        decoder = self.engine.decoder
        if self.in_flight is not None and self.in_flight.requests != self._requests():
            self._read_in_flight(emit)  # the slots changed: the decoder refills from the host's tokens, so read first
            if not self.busy:
                return
        rows: List[Optional[DecodeRow]] = []
        for r in self.slots:
            if r is None:
                rows.append(None)
                continue
            s, job = r.job.sampling, r.job
            position = len(job.context_ids) + len(job.query_ids) + len(r.tokens) - 1
            rows.append(DecodeRow(r.number, r.tokens[-1], position, r.held.encoded.seq, r.own, s.temperature,
                                  s.top_k, s.top_p, s.seed, s.logprobs, counter=len(r.tokens)))
        launched = decoder.launch(self.engine.pool, rows)
        self._read_in_flight(emit)
        if decoder.pipelined:
            self.in_flight = launched
        else:
            self._read(launched, emit)

    def _requests(self) -> tuple:
        return tuple(None if r is None else r.number for r in self.slots)

    def _read_in_flight(self, emit: Callable[[Job, Outcome], None]) -> None:
        if self.in_flight is not None:
            launched, self.in_flight = self.in_flight, None
            self._read(launched, emit)

    def _read(self, launched: Launched, emit: Callable[[Job, Outcome], None]) -> None:
        """Take a step's tokens for the requests still in the slots it was launched with."""
        n_layers = self.engine.model.arch.num_layers
        for i, (number, row) in enumerate(zip(launched.requests, launched.rows())):
            r = self.slots[i]
            if r is None or r.number != number:
                continue  # idle at the launch, or ended since (this row was computed after its last token)
            if r.own is not None:
                r.own.set_length(len(r.job.query_ids) + len(r.tokens))  # the fed token's K, V are held now
            if self._accept(r, Choice.read(row, n_layers, step=len(r.tokens)), emit):
                self.slots[i] = None

    def _accept(self, r: _Running, choice: Choice, emit: Callable[[Job, Outcome], None]) -> bool:
        """Take one chosen token; True if the request ended (its result emitted, its pages given back)."""
        job, s = r.job, r.job.sampling
        if choice.error is not None:
            self._leave(r)
            emit(job, NumericalError(choice.error))
            return True
        r.tokens.append(choice.token)
        entry = None
        if s.logprobs:
            entry = {"id": choice.token, "logprob": choice.logprob, "top": [list(x) for x in choice.top[: s.logprobs]]}
            r.logprobs.append(entry)
        if self.on_token is not None:
            self.on_token(job, choice.token, entry)
        reason = None
        if choice.token in self.engine.eos_token_ids:
            reason = "eos"
        elif choice.token in s.stop_token_ids or (job.stopped is not None and job.stopped(r.tokens)):
            reason = "stop"
        elif len(r.tokens) >= s.tokens_to_generate:
            reason = "length"
        if reason is None:
            return False
        self._leave(r)
        phase2_s = time.perf_counter() - r.t_query
        decode_s = phase2_s - r.first_token_s
        n = len(r.tokens)
        timings = {"phase1_s": round(r.phase1_s, 6), "phase2_s": round(phase2_s, 6),
                   "first_token_s": round(r.first_token_s, 6),
                   "decode_tokens_per_s": round((n - 1) / decode_s, 3) if n > 1 and decode_s > 0 else None}
        emit(job, Generation(r.tokens, reason, timings, r.logits, r.reused, r.logprobs if s.logprobs else None))
        return True

    def _leave(self, r: _Running) -> None:
        if r.own is not None:
            self.engine.pool.release(r.own)
        self.free[-1] += r.own_pages
        r.held.users -= 1
        self._trim()
