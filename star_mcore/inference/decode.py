"""Phase 2's decoding loop: the tokens after the first, one forward step each.

``eager``   each step through the phase-1 attention backend on the cache's current length (dynamic shapes):
            the reference the other two are tested against.
``static``  the step with static shapes: the KV buffers at their final size, token, position and KV lengths
            as device tensors, the few-query decode kernel, argmax and the EOS check on the device.
``graph``   the static step captured once per request as a CUDA graph (every layer, the phase-2 merge's
            all-gather, TP's all-reduce, the token broadcast) and replayed per token: no per-token Python or
            launch cost. Where graphs cannot be used (not CUDA, or the capture fails) it runs the static step
            without a graph, after one log line saying why.

Every loop returns the same tokens: the ones generated after the first, up to and including an EOS id, at
most ``steps``; a step whose attention output or logits were not finite raises :class:`NumericalError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional

import torch
import torch.distributed as dist

from ..config import DECODE_LOOPS
from .kv_cache import KVCache
from .logs import log
from .requests import RequestError
from .steps import QueryStep, StaticQueryStep

if TYPE_CHECKING:
    from .engine import Engine

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
    def run(self, engine: "Engine", cache: KVCache, decision: Tensor, position: int, steps: int) -> List[int]:
        m, g = engine.model, engine.groups
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


_SAID: set = set()  # the reasons already logged


class StaticDecode:
    """The static step, replayed from a CUDA graph when ``graphs`` (and the device allows it)."""

    def __init__(self, graphs: bool) -> None:
        self.graphs = graphs
        self.warm = False  # a step ran eagerly on this device: kernels compiled, library handles made
        self.replayed = False  # the last request's steps were replayed from a graph

    def _no_graph(self, why: str) -> None:
        """One log line per process and reason (rank 0 speaks for all)."""
        if why not in _SAID and (not dist.is_initialized() or dist.get_rank() == 0):
            log(f"decode: {why}; running the static decode step without a CUDA graph (same tokens, slower)")
        _SAID.add(why)

    def run(self, engine: "Engine", cache: KVCache, decision: Tensor, position: int, steps: int) -> List[int]:
        m, g = engine.model, engine.groups
        dev = g.device
        held = len(cache)
        s = StaticState(
            token=decision[:1].clone(), position=torch.tensor([position], device=dev),
            attend_len=torch.tensor([held + (1 if g.is_query_host else 0)], device=dev),
            write_at=torch.tensor([held], device=dev) if g.is_query_host else None,
            decision=decision, rows=torch.zeros(steps, 2, dtype=torch.long, device=dev),
            index=torch.zeros(1, dtype=torch.long, device=dev), stop=torch.zeros(1, dtype=torch.bool, device=dev),
            eos=torch.tensor(list(engine.eos_token_ids), dtype=torch.long, device=dev))

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

        use_graph = self.graphs and steps > 1
        if use_graph and dev.type != "cuda":
            self._no_graph(f"CUDA graphs need a CUDA device (this run is on {dev.type})")
            use_graph = False
        self.replayed = False
        with m.attending(StaticQueryStep(engine.decode_kernel, cache, g.cp, s.attend_len, s.write_at)):
            done = self._replay(step, s, steps) if use_graph else self._loop(step, s, steps)
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

    def _replay(self, step, s: StaticState, steps: int) -> int:
        """Capture the step and replay it. Before the first capture of this loop object one step runs eagerly on
        a side stream (CUDA's warm-up: kernels compiled, library handles made; it is the first real step);
        later requests capture at once. The host reads each step's stop flag one step late, so the GPU always
        has the next step queued: after an EOS at most one step more runs, and is discarded."""
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
