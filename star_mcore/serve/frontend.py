"""The HTTP front end: a process of its own beside global rank 0 (FastAPI on uvicorn), started by
:mod:`.loop` as ``python -m star_mcore.serve.frontend FD`` with its settings as JSON on stdin. It checks and
tokenizes each request, hands it to rank 0 over the connection ``FD`` and turns the tokens that come back into
OpenAI's responses (whole, or server-sent events).

A process, not a thread of rank 0: the engine's loop keeps the GIL while it steps, and a rank that dies or is
ended by the watchdog (SIGKILL) must not take the server's answer with it. When rank 0's end of the connection
closes, every open and later request gets a 503, and the front end exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import sys
import threading
import uuid
from multiprocessing.connection import Connection
from typing import Any, Dict, Optional

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from omegaconf import OmegaConf

from ..config import InferenceConfig
from ..inference.requests import RequestError, Tokenizer, parse_request
from .openai_api import Answer, ApiError, chat_request, completion_request, request_error

DEAD_EXIT_S = 2.0  # after rank 0 is gone: how long 503s are still given before the front end exits


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj)}\n\n"


class Frontend:
    """The requests in flight (each an asyncio queue the reader thread fills) and the server's state:
    serving, draining (SIGTERM: nothing new), dead (rank 0 gone)."""

    def __init__(self, conn: Connection, spec: Dict[str, Any]) -> None:
        self.conn = conn
        self.model = spec["model"]
        self.inference: InferenceConfig = OmegaConf.to_object(
            OmegaConf.merge(OmegaConf.structured(InferenceConfig), spec["inference"]))
        self.vocab_size, self.max_positions = spec["vocab_size"], spec["max_positions"]
        self.tokenizer = Tokenizer(spec["tokenizer_dir"], chat=self.inference.apply_chat_template)
        try:
            self.tokenizer.require()
            self.text: Optional[Tokenizer] = self.tokenizer
        except RequestError:
            self.text = None  # token ids only
        self.pending: Dict[str, asyncio.Queue] = {}
        self.state = "serving"
        self.exit_code = 0
        self.server: Optional[uvicorn.Server] = None
        self.loop: Optional[asyncio.AbstractEventLoop] = None
        self.outbox: queue.SimpleQueue = queue.SimpleQueue()  # to rank 0, sent by a thread of its own

    # --- rank 0's messages -----------------------------------------------------------------------------------
    def start_threads(self) -> None:
        """The reader of rank 0's messages and the writer of ours: a long context's request must not hold the
        event loop (the other streams) while rank 0 is busy in a phase 1 and does not read."""
        self.loop = asyncio.get_running_loop()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._write, daemon=True).start()

    def _write(self) -> None:
        while True:
            msg = self.outbox.get()
            try:
                self.conn.send(msg)
            except OSError:
                return  # rank 0 is gone: the reader thread says so

    def _read(self) -> None:
        while True:
            try:
                msg = self.conn.recv()
            except (EOFError, OSError):
                self.loop.call_soon_threadsafe(self._rank0_gone)
                return
            self.loop.call_soon_threadsafe(self._dispatch, msg)

    def _dispatch(self, msg: tuple) -> None:
        if msg[0] == "draining":
            self.state = "draining"
        elif msg[0] == "exit":
            self.state = "exiting"
            for rid, q in self.pending.items():  # came in after the ranks' last turn
                q.put_nowait(("error", rid, 503, "the server is shutting down"))
            self.server.should_exit = True
        elif msg[1] in self.pending:
            self.pending[msg[1]].put_nowait(msg)

    def _rank0_gone(self) -> None:
        if self.state == "exiting":
            return
        self.state = "dead"
        for rid, q in self.pending.items():
            q.put_nowait(("error", rid, 503, "the server's engine stopped (a rank failed or was killed); "
                          "restart the server"))
        self.exit_code = 1
        self.loop.call_later(DEAD_EXIT_S, lambda: setattr(self.server, "should_exit", True))

    def _send(self, msg: tuple) -> None:
        self.outbox.put(msg)

    # --- requests --------------------------------------------------------------------------------------------
    def unavailable(self) -> Optional[ApiError]:
        if self.state == "serving":
            return None
        why = "is shutting down" if self.state in ("draining", "exiting") else "lost its engine (a rank failed)"
        return ApiError(503, f"the server {why}", kind="service_unavailable", code="unavailable")

    async def handle(self, request: Request, kind: str):
        try:
            busy = self.unavailable()
            if busy is not None:
                raise busy
            try:
                body = await request.json()
            except ValueError:
                raise ApiError(400, "the request body is not valid JSON") from None
            if not isinstance(body, dict):
                raise ApiError(400, "the request body must be a JSON object")
            fields = (chat_request(body, self.model, self.tokenizer) if kind == "chat"
                      else completion_request(body, self.model))
            rid = ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex
            req = parse_request(json.dumps(dict(fields, id=rid)), 1, self.tokenizer, self.vocab_size,
                                self.max_positions, self.inference)
            if req.error is not None:
                raise request_error(RequestError(req.error))
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        top = body.get("top_logprobs" if kind == "chat" else "logprobs") or 0
        answer = Answer(kind, rid, self.model, req, self.text, top)
        stream = bool(body.get("stream"))
        q: asyncio.Queue = asyncio.Queue()
        self.pending[rid] = q
        self._send(("new", rid, req, stream))
        msg = await self._next(request, q)
        if msg is None or msg[0] == "error" or not stream:
            self.pending.pop(rid, None)
        if msg is None:  # the client left before its answer: nobody reads what we would send
            self._send(("cancel", rid))
            return JSONResponse({}, status_code=499)
        if msg[0] == "error":
            return JSONResponse(_error(msg).body(), status_code=msg[2])
        if not stream:
            return JSONResponse(answer.whole(msg[2]))
        usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(self._events(request, rid, q, msg, answer, usage), media_type="text/event-stream")

    @staticmethod
    async def _next(request: Request, q: asyncio.Queue) -> Optional[tuple]:
        """The next message for a request that waits for its first token or its whole answer; None if its client
        has left meanwhile (looked at every second)."""
        while True:
            try:
                return await asyncio.wait_for(q.get(), timeout=1.0)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return None

    async def _events(self, request: Request, rid: str, q: asyncio.Queue, msg: tuple, answer: Answer, usage: bool):
        """The stream's server-sent events, from the first token to ``[DONE]``. A client that leaves (seen at the
        next token) has its request cancelled on every rank, which frees its slot and pages."""
        ids, entries = [], [] if answer.req.logprobs else None
        done = False
        try:
            first = answer.first_chunk()
            if first is not None:
                yield _sse(first)
            while True:
                result = None
                if msg[0] == "error":
                    done = True
                    yield _sse(_error(msg).body())
                    break
                if msg[0] == "token":
                    ids.append(msg[2])
                    if entries is not None:
                        entries.append(msg[3])
                else:
                    result, done = msg[2], True
                    ids, entries = result["generated_ids"], result["logprobs"]
                chunk = answer.chunk(ids, entries, result)
                if chunk is not None:
                    yield _sse(chunk)
                if done:
                    if usage:
                        yield _sse(answer.usage_chunk(result))
                    yield "data: [DONE]\n\n"
                    break
                if await request.is_disconnected():
                    break
                msg = await q.get()
        finally:
            self.pending.pop(rid, None)
            if not done:
                self._send(("cancel", rid))


def _error(msg: tuple) -> ApiError:
    """Rank 0's ("error", id, status, message) as an API error."""
    kinds = {400: "invalid_request_error", 500: "server_error", 503: "service_unavailable"}
    return ApiError(msg[2], msg[3], kind=kinds.get(msg[2], "server_error"))


def build_app(front: Frontend) -> FastAPI:
    app = FastAPI(title="star-mcore", docs_url=None, redoc_url=None, openapi_url=None)

    @app.get("/health")
    async def health():
        busy = front.unavailable()
        if busy is not None:
            return JSONResponse(busy.body(), status_code=503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": front.model, "object": "model", "created": 0,
                                            "owned_by": "star-mcore"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await front.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await front.handle(request, "chat")

    return app


class _Server(uvicorn.Server):
    """uvicorn without its signal handlers: rank 0 decides when the server stops (SIGTERM drains every rank)."""

    def capture_signals(self):
        import contextlib

        return contextlib.nullcontext()

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        self.front.start_threads()
        self.front._send(("listening",))


def main() -> int:
    fd = int(sys.argv[1])
    spec = json.loads(sys.stdin.read())
    for sig in (signal.SIGTERM, signal.SIGINT):  # the ranks get them and tell us when to go
        signal.signal(sig, signal.SIG_IGN)
    conn = Connection(fd)
    sock = socket.socket(socket.AF_INET6 if ":" in spec["host"] else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((spec["host"], spec["port"]))
    except OSError as e:
        conn.send(("failed", f"serve.host={spec['host']} serve.port={spec['port']}: cannot listen there "
                             f"({e.strerror or e})"))
        return 2
    front = Frontend(conn, spec)
    server = _Server(uvicorn.Config(build_app(front), log_level="warning", lifespan="off", access_log=False))
    server.front = front
    front.server = server
    conn.send(("bound", sock.getsockname()[1]))
    server.run(sockets=[sock])
    return front.exit_code


if __name__ == "__main__":
    os._exit(main())  # the reader thread may still wait on the connection
