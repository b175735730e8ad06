"""``star-mcore serve``'s serving loop, the same on every rank, over one :class:`.ContinuousBatch`.

Global rank 0 starts the HTTP front end (:mod:`.frontend`) and reads its messages: new requests (already checked
and tokenized) and cancellations. At each turn of the loop rank 0 broadcasts what it read to every rank, in one
broadcast over a gloo group, so every rank admits, cancels and stops alike; then the batch admits what fits and
decodes one step. With nothing running and nothing waiting, rank 0 waits for a message for at most ``TICK_S``
and broadcasts even an empty turn, so no rank waits in a collective longer than that (the watchdog's heartbeats
run in their own process meanwhile). Rank 0 sends each request's tokens (streams) and result back.

Resident contexts: the batch keeps encoded contexts between requests (least recently used first out, within
the KV pool and ``serve.max_resident_tokens``), so a question over a held context starts at phase 2.

SIGTERM (or Ctrl-C): rank 0 stops admitting (waiting requests get a 503), lets the running ones finish for
``serve.drain_s``, cancels the rest, and every rank leaves together; the process exits 0.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time
from collections import deque
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, Deque, Dict, List, Optional, Set

import torch.distributed as dist
from omegaconf import OmegaConf

from ..config import RunConfig
from ..errors import RunError
from ..inference.batch import ContinuousBatch, Job, Outcome
from ..inference.engine import Generation
from ..inference.logs import log
from ..inference.planner import serve_pool_pages
from ..inference.preflight import preflight
from ..inference.requests import RequestError, Tokenizer
from ..inference.runner import Session, open_session, request_job
from ..model.checkpoint import open_checkpoint
from ..parallel.groups import broadcast_from_rank0, control_group

TICK_S = 1.0  # the longest an idle turn of the loop waits for a request
START_S = 300.0  # how long rank 0 waits for the front end to listen


def model_name(cfg: RunConfig) -> str:
    """``serve.model_name``, else the checkpoint folder's name."""
    ck = cfg.checkpoint
    return cfg.serve.model_name or Path(ck.hf_path or ck.megatron_path).resolve().name


def start_frontend(cfg: RunConfig, vocab_size: int, max_positions: int, tokenizer_dir: str):
    """Start the front end and wait until it listens: (its process, rank 0's end of its connection, the port)."""
    ours, theirs = socket.socketpair()
    spec = {"host": cfg.serve.host, "port": cfg.serve.port, "model": model_name(cfg),
            "inference": OmegaConf.to_container(OmegaConf.structured(cfg.inference)), "vocab_size": vocab_size,
            "max_positions": max_positions, "tokenizer_dir": tokenizer_dir}
    proc = subprocess.Popen([sys.executable, "-m", "star_mcore.serve.frontend", str(theirs.fileno())],
                            pass_fds=(theirs.fileno(),), stdin=subprocess.PIPE)
    theirs.close()
    proc.stdin.write(json.dumps(spec).encode())
    proc.stdin.close()
    conn = Connection(ours.detach())
    port = None
    deadline = time.monotonic() + START_S
    while True:
        if not conn.poll(max(0.0, deadline - time.monotonic())):
            proc.kill()
            raise RunError(f"the HTTP front end did not start within {START_S:.0f} s")
        try:
            msg = conn.recv()
        except EOFError:
            raise RunError(f"the HTTP front end exited at start (code {proc.wait()})") from None
        if msg[0] == "failed":
            proc.wait()
            raise RunError(msg[1])
        if msg[0] == "bound":
            port = msg[1]
        if msg[0] == "listening":
            return proc, conn, port


class ServeLoop:
    """One rank's side of the server. ``conn``: rank 0's connection to the front end (None elsewhere)."""

    def __init__(self, cfg: RunConfig, session: Session, conn: Optional[Connection]) -> None:
        self.cfg, self.s, self.conn = cfg, session, conn
        self.batch = ContinuousBatch(session.engine, cfg.serve.max_resident_tokens or None, self._token)
        self.group = control_group()
        self.waiting: Deque[Job] = deque()  # received, not yet admitted (the same on every rank)
        self.streams: Set[str] = set()  # rank 0: requests whose tokens go out one by one
        self.signalled = False  # this rank got SIGTERM / SIGINT
        self.stopping = False  # agreed: no more admissions
        self.deadline = 0.0  # rank 0: when the running requests are cancelled

    # --- rank 0 and the front end ----------------------------------------------------------------------------
    def _tell(self, msg: tuple) -> None:
        if self.conn is not None:
            self.conn.send(msg)

    def _token(self, job: Job, token: int, entry: Optional[Dict[str, Any]]) -> None:
        if job.tag in self.streams:
            self._tell(("token", job.tag, token, entry))

    def _emit(self, job: Job, out: Outcome) -> None:
        if self.conn is None:
            return
        self.streams.discard(job.tag)
        if isinstance(out, Generation):
            self._tell(("done", job.tag, {"generated_ids": out.generated_ids, "finish_reason": out.finish_reason,
                                          "logprobs": out.logprobs, "context_reused": out.context_reused,
                                          "timings": out.timings}))
        else:
            self._tell(("error", job.tag, 400 if isinstance(out, RequestError) else 500, str(out)))

    def _refuse(self, job: Job, why: str) -> None:
        self.streams.discard(job.tag)
        self._tell(("error", job.tag, 503, why))

    def _read(self, idle: bool) -> List[tuple]:
        """Rank 0: the front end's messages since the last turn (waiting up to TICK_S for one when ``idle``),
        and its own decisions to stop and to cancel."""
        msgs: List[tuple] = []
        try:
            if idle and not self.signalled:
                self.conn.poll(TICK_S)
            while self.conn.poll(0):
                msgs.append(self.conn.recv())
        except (EOFError, OSError):
            raise RunError("the HTTP front end exited unexpectedly") from None
        if self.signalled and not self.stopping:
            msgs.append(("stop",))
            self.deadline = time.monotonic() + self.cfg.serve.drain_s
        elif self.stopping and self.batch.busy and time.monotonic() >= self.deadline:
            msgs.append(("cancel_all",))
        return msgs

    # --- every rank ------------------------------------------------------------------------------------------
    def _apply(self, msg: tuple) -> None:
        kind = msg[0]
        if kind == "new":
            _, rid, req, stream = msg
            job = request_job(req, self.cfg.inference, self.s.tokenizer, rid)
            if self.stopping:
                self._refuse(job, "the server is shutting down")
                return
            if stream and self.conn is not None:
                self.streams.add(rid)
            self.waiting.append(job)
        elif kind == "cancel":
            rid = msg[1]
            self.streams.discard(rid)
            if not self.batch.cancel(rid):
                self.waiting = deque(j for j in self.waiting if j.tag != rid)
            if self.conn is not None:
                log(f"request {rid}: cancelled (its client left)")
        elif kind == "stop":
            self.stopping = True
            self._tell(("draining",))
            while self.waiting:
                self._refuse(self.waiting.popleft(), "the server is shutting down")
        elif kind == "cancel_all":
            for r in self.batch.slots:
                if r is not None:
                    self.batch.cancel(r.job.tag)
                    self._refuse(r.job, f"the server is shutting down: cancelled after serve.drain_s="
                                        f"{self.cfg.serve.drain_s:g} s")

    def run(self, pages: int) -> None:
        """Serve until SIGTERM / SIGINT (agreed through rank 0), then drain."""
        def on_signal(*_):
            self.signalled = True

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
        self.batch.open(pages)
        try:
            while True:
                idle = not (self.batch.busy or self.waiting)
                for msg in broadcast_from_rank0(self._read(idle) if self.conn is not None else None, self.group):
                    self._apply(msg)
                while self.waiting and self.batch.offer(self.waiting[0], self._emit):
                    self.waiting.popleft()
                if self.batch.busy:
                    self.batch.step(self._emit)
                elif self.stopping and not self.waiting:
                    break
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        self.batch.close()


def run_serve(cfg: RunConfig) -> int:
    """``star-mcore serve``: every rank loads the model and serves until SIGTERM; rank 0 listens on HTTP."""
    arch = preflight(cfg)
    tokenizer_dir = open_checkpoint(cfg.checkpoint).tokenizer_dir
    tokenizer = Tokenizer(tokenizer_dir, chat=cfg.inference.apply_chat_template)
    pages = serve_pool_pages(cfg, arch)
    with open_session(cfg, arch, tokenizer) as s:
        proc = conn = None
        if dist.get_rank() == 0:
            proc, conn, port = start_frontend(cfg, arch.vocab_size, arch.max_position_embeddings, tokenizer_dir)
            log(f"serving {model_name(cfg)} on http://{cfg.serve.host}:{port} ({cfg.inference.context_parallel_mode}, "
                f"TP {cfg.model.tensor_model_parallel_size} x CP {cfg.model.context_parallel_size}, "
                f"{pages - 1} KV pages of {cfg.inference.kv_page_size} tokens per host)")
        ServeLoop(cfg, s, conn).run(pages)
        if proc is not None:
            conn.send(("exit",))
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
            log("server stopped")
    return 0
