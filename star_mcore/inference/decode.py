"""Phase 2's decoding loop: the tokens after the first, one forward step each.

``eager``   each step through the phase-1 attention backend on the cache's current length (dynamic shapes):
            the reference the other two are tested against.
``static``  the step with static shapes: the KV buffers at their final size, token, position and KV lengths
            as device tensors, the few-query decode kernel, argmax and the EOS check on the device.
``graph``   the static step captured as a CUDA graph (every layer, the phase-2 merge's all-gather, TP's
            all-reduce, the token broadcast) and replayed per token: no per-token Python or launch cost. The
            graph is kept for the next answer over the same held context (context reuse): it reads the same KV
            buffers, so that answer replays it without a new capture. Where graphs cannot be used (not CUDA, or
            the capture fails) it runs the static step without a graph, after one log line saying why.

Every loop returns the same tokens: the ones generated after the first, up to and including an EOS id, at
most ``steps``; a step whose attention output or logits were not finite raises :class:`NumericalError`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, List, Optional

import torch
import torch.distributed as dist

from ..config import DECODE_LOOPS
from .kv_cache import KVCache
from .logs import log
from .requests import RequestError
from .steps import QueryStep, StaticQueryStep

if TYPE_CHECKING:
    from .engine import EncodedContext, Engine

Tensor = torch.Tensor


class NumericalError(RequestError):
    """NaN/Inf in a request's attention outputs or logits; reported in that request's output line."""


def check_decision(bad_layer: int, num_layers: int, step: int) -> None:
    """Raise for a phase-2 step whose decision flags a non-finite layer output (< num_layers) or logits."""
    if bad_layer < num_layers:
        raise NumericalError(f"non-finite values (NaN/Inf) in the attention output of layer {bad_layer} "
                             f"during phase 2 (step {step})")
    if bad_layer == num_layers + 1:
        raise NumericalError(f"non-finite logits during phase 2 (step {step})")


def _keep(rows: List[List[int]], engine: "Engine") -> List[int]:
    """Tokens of the decision rows [token, flags] of steps 1.., in order, up to an EOS; raises on a bad step."""
    out = []
    for i, (token, bad) in enumerate(rows):
        check_decision(bad, engine.model.arch.num_layers, step=i + 1)
        out.append(token)
        if token in engine.eos_token_ids:
            break
    return out


class EagerDecode:
    def run(self, engine: "Engine", context: "EncodedContext", decision: Tensor, position: int,
            steps: int) -> List[int]:
        m, g, cache = engine.model, engine.groups, context.cache
        rows: List[List[int]] = []
        with m.attending(QueryStep(engine.attn, cache, g.cp, g.is_query_host)):
            for i in range(steps):
                m.runtime.reset_guard(g.device)
                hidden = m.hidden(decision[:1].clone(), torch.arange(position + i, position + i + 1))
                engine.decide(hidden, decision)
                rows.append(decision.tolist())
                if rows[-1][1] != m.arch.num_layers or rows[-1][0] in engine.eos_token_ids:
                    break
        return _keep(rows, engine)


@dataclass
class StaticState:
    """The device tensors one static step reads and advances in place (a graph replays on these addresses)."""

    token: Tensor  # [1] int64: the token fed to this step
    position: Tensor  # [1] int64
    attend_len: Tensor  # [1] int64: keys this host attends to
    write_at: Optional[Tensor]  # [1] int64 on the query host: where this step's K, V go
    decision: Tensor  # [2] int64: [next token, non-finite flags] (see Engine.decide)
    rows: Tensor  # [steps, 2] int64: every step's decision
    index: Tensor  # [1] int64: this step's row
    stop: Tensor  # [1] bool: an EOS was generated
    eos: Tensor  # [n_eos] int64

    @classmethod
    def allocate(cls, steps: int, eos: List[int], query_host: bool, device: torch.device) -> "StaticState":
        one = lambda: torch.zeros(1, dtype=torch.long, device=device)  # noqa: E731
        return cls(token=one(), position=one(), attend_len=one(), write_at=one() if query_host else None,
                   decision=torch.zeros(2, dtype=torch.long, device=device),
                   rows=torch.zeros(steps, 2, dtype=torch.long, device=device), index=one(),
                   stop=torch.zeros(1, dtype=torch.bool, device=device),
                   eos=torch.tensor(eos, dtype=torch.long, device=device))

    def start(self, decision: Tensor, position: int, held: int) -> None:
        """Set for a new run of steps, in place: after the query pass's ``decision``, at ``position``, with
        ``held`` tokens in this host's cache."""
        self.decision.copy_(decision)
        self.token.copy_(decision[:1])
        self.position.fill_(position)
        self.attend_len.fill_(held + (1 if self.write_at is not None else 0))
        if self.write_at is not None:
            self.write_at.fill_(held)
        self.rows.zero_()
        self.index.zero_()
        self.stop.zero_()


@dataclass
class _Kept:
    """A captured step, kept for the next answer over the same context: the graph, the state it replays on,
    and what it was captured for. ``cache`` is weak, so a released context's KV is freed, not held here."""

    graph: "torch.cuda.CUDAGraph"
    state: StaticState
    cache: "weakref.ref[KVCache]"
    room: int

    def fits(self, context: "EncodedContext", steps: int) -> bool:
        """Whether ``context``'s cache is the captured one with the same buffers (``room``, the query host's
        tokens past the share, is what sizes them; it is the same on every rank, so every rank agrees)."""
        return (self.cache() is context.cache and self.room == context.room
                and self.state.rows.shape[0] == steps)


_SAID: set = set()  # the reasons already logged


class StaticDecode:
    """The static step, replayed from a CUDA graph when ``graphs`` (and the device allows it)."""

    def __init__(self, graphs: bool) -> None:
        self.graphs = graphs
        self.warm = False  # a step ran eagerly on this device: kernels compiled, library handles made
        self.kept: Optional[_Kept] = None  # the last captured graph, for the next answer over its context
        self.replayed = False  # the last request's steps were replayed from a graph
        self.reused = False  # ... from the graph kept from the request before (no capture)

    def _no_graph(self, why: str) -> None:
        """One log line per process and reason (rank 0 speaks for all)."""
        if why not in _SAID and (not dist.is_initialized() or dist.get_rank() == 0):
            log(f"decode: {why}; running the static decode step without a CUDA graph (same tokens, slower)")
        _SAID.add(why)

    def run(self, engine: "Engine", context: "EncodedContext", decision: Tensor, position: int,
            steps: int) -> List[int]:
        m, g, cache = engine.model, engine.groups, context.cache
        dev, held = g.device, len(cache)
        use_graph = self.graphs and steps > 1
        if use_graph and dev.type != "cuda":
            self._no_graph(f"CUDA graphs need a CUDA device (this run is on {dev.type})")
            use_graph = False
        self.replayed = self.reused = False
        if use_graph and self.kept is not None and self.kept.fits(context, steps):
            s = self.kept.state
            s.start(decision, position, held)
            done = self._replay_graph(self.kept.graph, s, steps)
            self.replayed = self.reused = True
        else:
            self.kept = None  # its graph and pool go before the next capture
            s = StaticState.allocate(steps, list(engine.eos_token_ids), g.is_query_host, dev)
            s.start(decision, position, held)

            def step() -> None:
                m.runtime.reset_guard(dev)
                engine.decide(m.hidden(s.token, s.position), s.decision)
                s.rows.index_copy_(0, s.index, s.decision[None])
                s.stop |= (s.eos == s.decision[0]).any() | (s.decision[1] != m.arch.num_layers)
                s.token.copy_(s.decision[:1])
                s.position += 1
                s.index += 1
                if s.write_at is not None:
                    s.write_at += 1
                    s.attend_len += 1

            with m.attending(StaticQueryStep(engine.decode_kernel, cache, g.cp, s.attend_len, s.write_at)):
                done = self._capture_and_replay(step, s, steps, context) if use_graph else self._loop(step, s, steps)
        out = _keep(s.rows[:done].tolist(), engine)
        if g.is_query_host:  # the fed tokens' K, V (a step run past the stop wrote one more: not held)
            cache.set_length(held + len(out))
        return out

    @staticmethod
    def _loop(step, s: StaticState, steps: int, done: int = 0) -> int:
        while done < steps:
            step()
            done += 1
            if bool(s.stop):  # one read per step: every rank stops after the same step
                break
        return done

    def _capture_and_replay(self, step: Callable[[], None], s: StaticState, steps: int,
                            context: "EncodedContext") -> int:
        """Capture the step, keep the graph for the next answer over ``context``, and replay it. Before the
        first capture of this loop object one step runs eagerly on a side stream (CUDA's warm-up: kernels
        compiled, library handles made; it is the first real step); later requests capture at once."""
        done = 0
        if not self.warm:
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):
                step()
            torch.cuda.current_stream().wait_stream(side)
            self.warm, done = True, 1
            if bool(s.stop) or steps == 1:
                return done
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                step()
        except RuntimeError as e:  # a kernel or collective that cannot be captured here
            self._no_graph(f"the decode step could not be captured ({str(e).splitlines()[0][:200]})")
            self.graphs = False
            return self._loop(step, s, steps, done=done)
        self.replayed = True
        self.kept = _Kept(graph, s, weakref.ref(context.cache), context.room)
        return self._replay_graph(graph, s, steps, done)

    @staticmethod
    def _replay_graph(graph: "torch.cuda.CUDAGraph", s: StaticState, steps: int, done: int = 0) -> int:
        """Replay until ``steps`` ran or a stop flag was seen. The host reads each step's stop flag one step
        late, so the GPU always has the next step queued: after an EOS at most one step more runs, and is
        discarded."""
        stop_host = torch.zeros(steps + 1, dtype=torch.bool, pin_memory=True)  # [j]: stop flag after step j
        events = {}
        while done < steps:
            graph.replay()
            done += 1
            stop_host[done].copy_(s.stop[0], non_blocking=True)
            events[done] = torch.cuda.Event()
            events[done].record()
            if done - 1 in events:
                events.pop(done - 1).synchronize()
                if bool(stop_host[done - 1]):
                    break
        torch.cuda.current_stream().synchronize()
        return done


def decode_loop(name: str):
    """The loop object of ``inference.decode``."""
    if name == "eager":
        return EagerDecode()
    if name in ("graph", "static"):
        return StaticDecode(graphs=name == "graph")
    raise ValueError(f"unknown decode loop {name!r} ({', '.join(DECODE_LOOPS)})")
