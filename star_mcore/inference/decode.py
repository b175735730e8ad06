"""Phase 2's decode step for the whole running batch: one token per request, one forward, one collective per
layer, one verdict broadcast.

``eager``   only the busy slots' tokens, each request's attention through the phase-1 kernel on its own KV
            (dynamic shapes): the reference the other two are tested against.
``static``  every slot's token (idle ones too, writing to the pool's scratch page), static shapes: the paged
            kernel over the batch's groups (each context read once for all the requests over it, each
            request's own tokens apart), lengths, page tables and sampling parameters as device tensors.
``graph``   the static step captured as a CUDA graph and replayed: no per-step Python or launch cost. One
            graph per shape of the batch (the most requests sharing one context, the kernel's split count)
            and per sampler work (``ops.sampling.SamplerWork``: a greedy batch captures no sort), kept for
            the engine's lifetime: a new request only rewrites the device tensors it replays on.
            Where graphs cannot be used (not CUDA, or the capture fails) it runs the static step without a
            graph, after one log line saying why.

A loop's ``launch`` puts one step on the device and returns it as :class:`Launched`, whose verdict rows are read
when asked. The static loops advance every slot's state on the device, so the batch can launch the next step
before it reads this one (``pipelined``): the host's bookkeeping then overlaps the device's work instead of
leaving the device idle between steps. The eager loop reads its sequences' lengths on the host, so it runs one
step at a time.

Every loop gives the same tokens (greedy and seeded sampling alike: the sampler's noise depends only on a
request's seed and token index).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist

from ..config import DECODE_LOOPS
from ..ops.paged_attention import PagedKernel, PagedLayout, resolve_paged_kernel, split_count
from ..ops.sampling import SamplerWork, SamplingParams
from .host import Host
from .kv_cache import KVPool, KVSequence
from .logs import log
from .steps import EagerBatchStep, PagedBatchStep
from .verdict import decide, width

Tensor = torch.Tensor


@dataclass
class DecodeRow:
    """What a decode step needs of one busy slot: the token it feeds, at which position, the request's KV
    (its context's share here, its own tokens on the query host) and its sampling parameters."""

    request: int  # which request (unique within the batch's run): a slot keeps its device state while it is the same
    token: int
    position: int
    context: KVSequence
    own: Optional[KVSequence]
    temperature: float
    top_k: int
    top_p: float
    seed: int
    logprobs: int
    counter: int  # the index of the token this step chooses


@dataclass
class Launched:
    """A decode step on its way: the request in each slot when it was launched, and its verdict rows [slots,
    width] float64 on the host, complete once ``done`` (recorded after their copy) has passed."""

    requests: Tuple[Optional[int], ...]
    verdict: Tensor
    done: Optional["torch.cuda.Event"] = None

    def rows(self) -> List[Optional[List[float]]]:
        """Each slot's verdict row (None for a slot idle at the launch); waits for the step."""
        if self.done is not None:
            self.done.synchronize()
        out = self.verdict.tolist()
        return [None if r is None else out[s] for s, r in enumerate(self.requests)]


def _requests(rows: Sequence[Optional[DecodeRow]]) -> Tuple[Optional[int], ...]:
    return tuple(None if r is None else r.request for r in rows)


class EagerDecode:
    pipelined = False

    def __init__(self, host: Host) -> None:
        self.host = host

    def launch(self, pool: KVPool, rows: Sequence[Optional[DecodeRow]]) -> Launched:
        h, m, g = self.host, self.host.model, self.host.groups
        busy = [r for r in rows if r is not None]
        dev = g.device
        params = SamplingParams.allocate(len(busy), dev)
        params.fill(busy)
        verdict = torch.zeros(len(busy), width(m.arch.vocab_size), dtype=torch.float64, device=dev)
        with m.attending(EagerBatchStep(h.attn, [(r.context, r.own) for r in busy], g.cp)):
            m.runtime.reset_guard(dev, rows=len(busy))
            hidden = m.hidden(torch.tensor([r.token for r in busy]), torch.tensor([r.position for r in busy]))
        decide(h, hidden, params, SamplerWork.of(busy), verdict)
        full = torch.zeros(len(rows), verdict.shape[1], dtype=torch.float64)
        full[[s for s, r in enumerate(rows) if r is not None]] = verdict.cpu()
        return Launched(_requests(rows), full)


class _Inputs:
    """The device tensors one static step reads (a graph replays on these addresses), for one batch shape."""

    def __init__(self, slots: int, members: int, splits: int, table_width: int, vocab: int, query_host: bool,
                 device: torch.device) -> None:
        G = 2 * slots  # at most one group per distinct context, and one per slot's own tokens
        z = lambda *shape, dtype=torch.long: torch.zeros(*shape, dtype=dtype, device=device)  # noqa: E731
        self.tokens, self.positions = z(slots), z(slots)
        self.own_len = z(slots)  # tokens each slot's own sequence holds before this step
        self.write_at = z(slots) if query_host else None
        self.layout = PagedLayout(z(G, table_width, dtype=torch.int32), z(G, dtype=torch.int32),
                                  z(G, members) - 1, z(G), n_parts=2, splits=splits)
        self.params = SamplingParams.allocate(slots, device)
        self.verdict = torch.zeros(slots, width(vocab), dtype=torch.float64, device=device)

    def fill(self, rows: Sequence[Optional[DecodeRow]], contexts: List[KVSequence]) -> None:
        """Write this step's rows in place: tokens, positions, where each slot's new K, V go, the groups."""
        S, M = len(rows), self.layout.members.shape[1]
        W = self.layout.table.shape[1]
        table = torch.zeros(2 * S, W, dtype=torch.int32)
        lens = torch.zeros(2 * S, dtype=torch.int32)
        members = torch.full((2 * S, M), -1, dtype=torch.long)
        part = torch.zeros(2 * S, dtype=torch.long)
        index = {id(c): i for i, c in enumerate(contexts)}
        filled = [0] * len(contexts)
        write_at = torch.zeros(S, dtype=torch.long)  # idle slots: the scratch page
        own_len = torch.zeros(S, dtype=torch.long)
        for s, r in enumerate(rows):
            if r is None:
                continue
            j = index[id(r.context)]
            members[j, filled[j]] = s
            filled[j] += 1
            if r.own is not None:
                n = own_len[s] = len(r.own)
                write_at[s] = r.own.flat_positions(n, 1)[0]
                table[S + s, : len(r.own.pages)] = torch.tensor(r.own.pages, dtype=torch.int32)
                lens[S + s] = n + 1  # the token this step writes
                members[S + s, 0] = s
                part[S + s] = 1
        for j, c in enumerate(contexts):
            table[j, : len(c.pages)] = torch.tensor(c.pages, dtype=torch.int32)
            lens[j] = len(c)
        lay = self.layout
        for dst, src in ((lay.table, table), (lay.lens, lens), (lay.members, members), (lay.part, part),
                         (self.tokens, [0 if r is None else r.token for r in rows]),
                         (self.positions, [0 if r is None else r.position for r in rows]), (self.own_len, own_len)):
            dst.copy_(torch.as_tensor(src, dtype=dst.dtype))
        if self.write_at is not None:
            self.write_at.copy_(write_at)
        self.params.fill(rows)

    def advance(self, page_size: int) -> None:
        """After a step, on the device: every slot feeds the token it chose at the next position; the own
        groups hold one more key and the next one goes to the next place of the slot's pages. So a batch whose
        requests stay the same replays with no host write at all."""
        lay, S = self.layout, self.tokens.shape[0]
        self.tokens.copy_(self.verdict[:, 0].long())
        self.positions += 1
        self.params.counter += 1
        self.own_len += 1
        lay.lens[S:] += (lay.members[S:, 0] >= 0).int()
        if self.write_at is not None:
            page = lay.table[S:].gather(1, (self.own_len // page_size).clamp_max(lay.table.shape[1] - 1)[:, None])
            self.write_at.copy_(page[:, 0].long() * page_size + self.own_len % page_size)


_SAID: set = set()  # the reasons already logged


class StaticDecode:
    """The static step over ``slots`` slots, replayed from CUDA graphs when ``graphs`` (and the device allows)."""

    pipelined = True

    def __init__(self, host: Host, slots: int, graphs: bool, kernel: Optional[PagedKernel] = None) -> None:
        self.host, self.slots, self.graphs = host, slots, graphs
        self.kernel = kernel or resolve_paged_kernel(host.groups.device)
        dev = host.groups.device
        self.sms = torch.cuda.get_device_properties(dev).multi_processor_count if dev.type == "cuda" else 4
        self._inputs: Dict[Tuple[int, int], _Inputs] = {}
        self._graphs: Dict[Tuple[int, int, SamplerWork], "torch.cuda.CUDAGraph"] = {}
        # two host copies of the verdict: one step read while the next runs (pinned, so the copy is async)
        pin = dev.type == "cuda"
        self._out = [torch.zeros(slots, width(host.model.arch.vocab_size), dtype=torch.float64, pin_memory=pin)
                     for _ in range(2)]
        self._launches = 0
        self._pool: Optional[KVPool] = None
        self._filled: Optional[tuple] = None  # (shape, the request in each slot) the device state holds now
        self.replays = 0  # steps replayed from a graph (the tests read it)
        self.captures = 0

    def _no_graph(self, why: str) -> None:
        """One log line per process and reason (rank 0 speaks for all)."""
        if why not in _SAID and (not dist.is_initialized() or dist.get_rank() == 0):
            log(f"decode: {why}; running the static decode step without a CUDA graph (same tokens, slower)")
        _SAID.add(why)

    def launch(self, pool: KVPool, rows: Sequence[Optional[DecodeRow]]) -> Launched:
        """One step of ``rows``. The device state is written from the rows only when the requests in the slots
        changed since the last launch; otherwise it has advanced on the device and the rows' tokens and
        positions are not read (they may lag by the steps still in flight)."""
        h, m, g = self.host, self.host.model, self.host.groups
        if len(rows) != self.slots:
            raise ValueError(f"the static step runs {self.slots} slots, got {len(rows)}")
        if pool is not self._pool:  # graphs read the pool's buffers: a new pool needs new graphs
            self._inputs.clear()
            self._graphs.clear()
            self._pool = pool
        contexts: List[KVSequence] = []
        for r in rows:
            if r is not None and all(c is not r.context for c in contexts):
                contexts.append(r.context)
        most = max(sum(r is not None and r.context is c for r in rows) for c in contexts)
        shape = (1 << (most - 1).bit_length(), split_count(len(contexts), pool.k[0].shape[0], self.sms))
        if shape not in self._inputs:
            width_pages = -(-m.arch.max_position_embeddings // pool.page_size)
            self._inputs[shape] = _Inputs(self.slots, shape[0], shape[1], width_pages, m.arch.vocab_size,
                                          g.is_query_host, g.device)
        x = self._inputs[shape]
        work = SamplerWork.of(rows)
        key = (*shape, work)
        filled = (shape, _requests(rows))
        if filled != self._filled:  # new requests, or some left: the host writes the whole state
            x.fill(rows, contexts)
        self._filled = filled

        def run() -> None:
            with m.attending(PagedBatchStep(self.kernel, pool, x.layout, x.write_at, g.cp)):
                m.runtime.reset_guard(g.device, rows=self.slots)
                hidden = m.hidden(x.tokens, x.positions)
            decide(h, hidden, x.params, work, x.verdict)
            x.advance(pool.page_size)

        use_graph = self.graphs
        if use_graph and g.device.type != "cuda":
            self._no_graph(f"CUDA graphs need a CUDA device (this run is on {g.device.type})")
            use_graph = False
        if not use_graph:
            run()
        elif key in self._graphs:
            self._graphs[key].replay()
            self.replays += 1
        elif not self._capture(key, run, lambda: x.fill(rows, contexts)):
            run()
        out = self._out[self._launches % 2]
        self._launches += 1
        out.copy_(x.verdict, non_blocking=True)
        done = None
        if g.device.type == "cuda":
            done = torch.cuda.Event()
            done.record()
        return Launched(filled[1], out, done)

    def _capture(self, key, run, refill) -> bool:
        """Capture ``run`` for ``key`` and replay it once (this step). A shape seen for the first time runs
        eagerly on a side stream first (CUDA's warm-up: kernels compiled, library handles made); ``refill`` then
        puts the state back as it was before that run, and the replay does the step for real."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        refill()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                run()
        except RuntimeError as e:  # a kernel or collective that cannot be captured here
            self._no_graph(f"the decode step could not be captured ({str(e).splitlines()[0][:200]})")
            self.graphs = False
            return False
        self._graphs[key] = graph
        self.captures += 1
        graph.replay()
        self.replays += 1
        return True


def decode_loop(name: str, host: Host, slots: int):
    """The loop object of ``inference.decode`` for a batch of ``slots`` slots."""
    if name == "eager":
        return EagerDecode(host)
    if name in ("graph", "static"):
        return StaticDecode(host, slots, graphs=name == "graph")
    raise ValueError(f"unknown decode loop {name!r} ({', '.join(DECODE_LOOPS)})")
