"""``star-mcore serve``: a real server world (SmolLM2 at CP 2, star, gloo) answered through the ``openai`` client
and plain HTTP, compared token for token with ``generate``; a bounded concurrent load; bad requests; a client
that leaves mid-stream; SIGTERM's drain and a dead rank (tiny random models, worlds of their own)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

from distributed import free_port
from test_cli import CONFIG, ROOT, star_mcore, torchrun

CP2 = ["model.context_parallel_size=2", "inference.block_size=64", "inference.anchor_size=64",
       "inference.max_batch_size=4", "inference.apply_chat_template=true", "inference.tokens_to_generate=6",
       "serve.kv_pool_tokens=16384", "distributed.heartbeat_timeout_s=10"]
DOC = ("The harbour of Veltra holds three ships: the Marigold, painted green, the Osprey, painted red, and the "
       "Tern, painted blue. The harbour master is called Ilse and she keeps bees. ")
DOCS = [DOC * 2, "Numbers to remember: seven for the door, eleven for the safe, forty for the gate. " * 3,
        "A short note: the meeting moved to Thursday at noon, in the library's second room. " * 2,
        "Recipe: two eggs, one cup of flour, a pinch of salt; bake for twenty minutes. " * 2]


class Server:
    """A world of ``star-mcore serve`` ranks started directly (as srun would), its port and its ranks' logs."""

    def __init__(self, world: int, overrides, tmp: Path) -> None:
        self.port, master = free_port(), free_port()
        self.tmp = tmp
        self.procs = []
        for r in range(world):
            env = dict(os.environ, RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r), MASTER_ADDR="127.0.0.1",
                       MASTER_PORT=str(master), OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
            err = open(tmp / f"rank{r}.err", "w")
            self.procs.append((subprocess.Popen(
                [sys.executable, "-m", "star_mcore", "serve", "--config", CONFIG, *overrides,
                 f"serve.port={self.port}"], env=env, stderr=err, stdout=subprocess.DEVNULL, cwd=ROOT), err))
        self.url = f"http://127.0.0.1:{self.port}"

    def log(self, rank: int = 0) -> str:
        return (self.tmp / f"rank{rank}.err").read_text()

    def wait_ready(self, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(p.poll() is not None for p, _ in self.procs):
                raise AssertionError(f"a rank exited: {self.log()[-3000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=5).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.5)
        raise AssertionError("the server did not start")

    def signal(self, sig: int, ranks=None) -> None:
        for r, (p, _) in enumerate(self.procs):
            if ranks is None or r in ranks:
                p.send_signal(sig)

    def wait(self, timeout: float = 120):
        deadline = time.monotonic() + timeout
        codes = []
        for p, err in self.procs:
            try:
                codes.append(p.wait(timeout=max(0.1, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                p.kill()
                codes.append(None)
            err.close()
        return codes

    def stop(self) -> None:
        for p, _ in self.procs:
            if p.poll() is None:
                p.kill()
        self.wait(10)


def _closed(port: int, timeout: float) -> bool:
    """Whether nothing listens on ``port`` any more within ``timeout`` (bounded polling)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) != 0:
                return True
        time.sleep(0.2)
    return False


# --- one SmolLM2 server world for the cases below -------------------------------------------------------------

QUESTIONS = [  # (context, query, extra sampling fields)
    (DOCS[0], "Which ship is red?", {}),
    (DOCS[0], "What does the harbour master keep?", {}),
    (DOCS[1], "Which number opens the safe?", {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "seed": 11}),
    (DOCS[2], "When is the meeting?", {"stop": [" "], "max_tokens": 10}),
]
LOAD = [(DOCS[i % 4], f"Question {i}: repeat the {['first', 'second', 'third', 'last'][i % 4]} word.",
         {"max_tokens": 3}) for i in range(24)]
CHAT = [{"role": "system", "content": DOCS[3]}, {"role": "user", "content": "How long does it bake?"}]


@pytest.fixture(scope="module")
def smol(smollm2_ckpt, tmp_path_factory):
    """The server (started first, it loads while ``generate`` answers the same requests) and generate's records."""
    from star_mcore.inference.requests import Tokenizer

    tmp = tmp_path_factory.mktemp("serve")
    overrides = [f"checkpoint.hf_path={smollm2_ckpt}", *CP2]
    server = Server(2, overrides, tmp)
    try:
        ctx, qry = Tokenizer(smollm2_ckpt).encode_messages(CHAT)
        lines = [dict({"id": f"q{i}", "context": c, "query": q}, **_generate_fields(x))
                 for i, (c, q, x) in enumerate(QUESTIONS + LOAD)]
        lines.append({"id": "chat", "context_ids": ctx, "query_ids": qry, "logprobs": 2})
        req, out = tmp / "req.jsonl", tmp / "out.jsonl"
        req.write_text("".join(json.dumps(x) + "\n" for x in lines))
        res = torchrun(2, [*overrides, f"inference.input_path={req}", f"inference.output_path={out}"])
        assert res.returncode == 0, res.stderr[-3000:]
        records = {r["id"]: r for r in map(json.loads, out.read_text().splitlines())}
        server.wait_ready()
        yield server, records
    finally:
        server.stop()


def _generate_fields(extra):
    return {{"max_tokens": "tokens_to_generate"}.get(k, k): v for k, v in extra.items()}


def _client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)


def test_models_and_health(smol):
    server, _ = smol
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert [m.id for m in _client(server).models.list().data] == ["smollm2"]


def test_completions_equal_generate_through_the_openai_client(smol):
    """Whole and streamed, greedy, seeded sampling and a stop string: the same tokens and text as generate's;
    the second question over a context starts at phase 2 (its context is resident)."""
    server, records = smol
    client = _client(server)
    for i, (ctx, q, extra) in enumerate(QUESTIONS):
        want = records[f"q{i}"]
        kw = dict(model="smollm2", prompt=q, extra_body={"context": ctx}, max_tokens=extra.get("max_tokens", 6),
                  **{k: v for k, v in extra.items() if k in ("temperature", "top_p", "seed", "stop")})
        if "top_k" in extra:
            kw["extra_body"]["top_k"] = extra["top_k"]
        whole = client.completions.create(**kw).model_dump()
        choice = whole["choices"][0]
        assert choice["token_ids"] == want["generated_ids"] and choice["text"] == want["text"]
        assert choice["finish_reason"] == ("length" if want["finish_reason"] == "length" else "stop")
        assert whole["usage"]["completion_tokens"] == len(want["generated_ids"])
        if i == 1:  # the first question's context is held
            assert whole["usage"]["context_reused"] is True
        if i in (1, 2):
            continue  # streams: greedy and stop strings (held-back text) suffice; sampling is per token alike
        chunks = list(client.completions.create(stream=True, **kw))
        assert "".join(c.choices[0].text for c in chunks) == want["text"]
        assert sum((c.model_dump()["choices"][0]["token_ids"] for c in chunks), []) == want["generated_ids"]
        assert chunks[-1].choices[0].finish_reason == choice["finish_reason"]


def test_resident_context_is_reused(smol):
    server, _ = smol
    body = {"model": "smollm2", "context": DOCS[2] + " Extra.", "prompt": "Where?", "max_tokens": 2}
    first = httpx.post(server.url + "/v1/completions", json=body, timeout=300).json()
    again = httpx.post(server.url + "/v1/completions", json=dict(body, prompt="When?"), timeout=300).json()
    assert (first["usage"]["context_reused"], again["usage"]["context_reused"]) == (False, True)


def test_chat_equals_generate_and_streams_the_same_text(smol, smollm2_ckpt):
    from star_mcore.inference.requests import Tokenizer

    server, records = smol
    client = _client(server)
    want = records["chat"]
    whole = client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, logprobs=True,
                                           top_logprobs=2)
    text = whole.choices[0].message.content
    assert text == Tokenizer(smollm2_ckpt).decode(want["generated_ids"])
    assert whole.usage.completion_tokens == len(want["generated_ids"])
    assert [x.logprob for x in whole.choices[0].logprobs.content] == [x["logprob"] for x in want["logprobs"]]
    assert len(whole.choices[0].logprobs.content[0].top_logprobs) == 2
    streamed = "".join(c.choices[0].delta.content or "" for c in
                       client.chat.completions.create(model="smollm2", messages=CHAT, max_tokens=6, stream=True)
                       if c.choices)
    assert streamed == text
    # plain HTTP, server-sent events by hand
    with httpx.stream("POST", server.url + "/v1/chat/completions", timeout=300,
                      json={"model": "smollm2", "messages": CHAT, "max_tokens": 6, "stream": True,
                            "stream_options": {"include_usage": True}}) as r:
        events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    usage = json.loads(events[-2])["usage"]
    assert usage["completion_tokens"] == len(want["generated_ids"]) and usage["context_reused"] is True


BAD = [  # (body, status, message, param)
    ({"context": "x", "prompt": "y", "temperature": -1}, 400, "temperature must be a number >= 0, got -1",
     "temperature"),
    ({"context": "x", "prompt": "y", "n": 2}, 400, "n must be 1: this server returns one choice per request (got 2)",
     "n"),
    ({"context": "x", "prompt": "y", "max_tokens": 0}, 400, "tokens_to_generate must be an integer >= 1, got 0",
     "max_tokens"),
    ({"context": "x", "prompt": "y", "best_of": 3}, 400, "best_of is not supported (only 1)", "best_of"),
    ({"prompt": "y"}, 400, 'a completion needs "context" (the document, encoded once and kept) beside "prompt" '
     "(the question over it)", "context"),
    ({"context": [1, 2], "prompt": [3, 99999]}, 400, "query_ids has token id 99999 outside the vocabulary "
     "[0, 49152)", None),
    ({"context": "x", "prompt": "y", "model": "gpt-4"}, 404, "The model 'gpt-4' does not exist (this server has "
     "'smollm2')", "model"),
    ({"context": [5] * 8190, "prompt": [6, 7], "max_tokens": 4}, 400, "context (8190) + query (2) + "
     "tokens_to_generate (4) = 8196 exceeds the model's max positions (8192)", None),
]


def test_bad_requests_are_400s_and_the_server_keeps_serving(smol):
    """generate's checks with generate's messages, OpenAI's error body; then a good request is answered."""
    server, records = smol
    for body, status, message, param in BAD:
        r = httpx.post(server.url + "/v1/completions", json=dict({"model": "smollm2"}, **body), timeout=60)
        assert r.status_code == status
        assert r.json() == {"error": {"message": message, "type": "invalid_request_error", "param": param,
                                      "code": "model_not_found" if status == 404 else None}}
    ctx, q, _ = QUESTIONS[0]
    ok = httpx.post(server.url + "/v1/completions", json={"context": ctx, "prompt": q, "max_tokens": 6},
                    timeout=300).json()
    assert ok["choices"][0]["token_ids"] == records["q0"]["generated_ids"]


def test_bad_chat_and_bad_json(smol):
    server, _ = smol
    r = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert r.status_code == 400
    assert r.json()["error"]["message"] == "the last message must be the user's question (got role 'assistant')"
    r = httpx.post(server.url + "/v1/completions", content=b"{nope", timeout=60)
    assert r.status_code == 400 and r.json()["error"]["message"] == "the request body is not valid JSON"
    with pytest.raises(openai.BadRequestError, match="unknown field 'tools'"):
        _client(server).chat.completions.create(model="smollm2", messages=CHAT, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {}}}])


def test_concurrent_load_is_batched_and_nothing_is_lost_or_mixed(smol):
    """24 clients at once over 4 contexts, half streaming: every answer is its own request's (generate's)."""
    server, records = smol
    got = {}

    def ask(i):
        ctx, q, extra = LOAD[i]
        body = {"model": "smollm2", "context": ctx, "prompt": q, "max_tokens": extra["max_tokens"]}
        with httpx.Client(timeout=600) as c:
            if i % 2:
                with c.stream("POST", server.url + "/v1/completions", json=dict(body, stream=True)) as r:
                    chunks = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
                got[i] = sum((ch["choices"][0]["token_ids"] for ch in chunks), [])
            else:
                got[i] = c.post(server.url + "/v1/completions", json=body).json()["choices"][0]["token_ids"]

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(LOAD))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    n = len(QUESTIONS)
    assert got == {i: records[f"q{n + i}"]["generated_ids"] for i in range(len(LOAD))}


def test_a_client_that_leaves_frees_its_slot(smol):
    """Mid-stream (seen at its next token), or while it waits for a whole answer (seen within a second)."""
    server, records = smol
    ctx, q, _ = QUESTIONS[0]
    with httpx.stream("POST", server.url + "/v1/completions", timeout=300,
                      json={"context": ctx, "prompt": q, "max_tokens": 4000, "stream": True}) as r:
        lines = r.iter_lines()
        assert next(x for x in lines if x.startswith("data: "))
    deadline = time.monotonic() + 120
    while "cancelled (its client left)" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert server.log().count("cancelled (its client left)") == 1
    with pytest.raises(httpx.ReadTimeout):  # a client that gives up waiting for a whole answer
        httpx.post(server.url + "/v1/completions", json={"context": ctx, "prompt": q, "max_tokens": 4000},
                   timeout=httpx.Timeout(60, read=3))
    while server.log().count("cancelled (its client left)") < 2 and time.monotonic() < deadline + 120:
        time.sleep(0.2)
    assert server.log().count("cancelled (its client left)") == 2
    ok = httpx.post(server.url + "/v1/completions", json={"context": ctx, "prompt": q, "max_tokens": 6},
                    timeout=300).json()
    assert ok["choices"][0]["token_ids"] == records["q0"]["generated_ids"]


# --- faults, on tiny random models ----------------------------------------------------------------------------

TINY = ["model.context_parallel_size=2", "inference.block_size=32", "inference.anchor_size=32",
        "inference.max_batch_size=2", "distributed.heartbeat_timeout_s=5", "serve.kv_pool_tokens=4096"]


def test_sigterm_drains_and_exits_0(gqa_ckpt, tmp_path):
    """SIGTERM: the running stream ends (finished, or cancelled at serve.drain_s with an error event), a new
    request gets a 503, every rank exits 0 and the port closes."""
    server = Server(2, [f"checkpoint.hf_path={gqa_ckpt}", *TINY, "serve.drain_s=1"], tmp_path)
    try:
        server.wait_ready()
        body = {"context": list(range(1, 60)), "prompt": [3, 4, 5], "max_tokens": 440, "stream": True}
        with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=300) as r:
            lines = r.iter_lines()
            assert next(x for x in lines if x.startswith("data: "))
            server.signal(signal.SIGTERM)
            deadline = time.monotonic() + 60
            while httpx.get(server.url + "/health").status_code == 200 and time.monotonic() < deadline:
                time.sleep(0.05)
            late = httpx.post(server.url + "/v1/completions", timeout=60,
                              json={"context": [1, 2], "prompt": [3], "max_tokens": 2})
            rest = [x[6:] for x in lines if x.startswith("data: ")]
        assert late.status_code == 503 and "shutting down" in late.json()["error"]["message"]
        last = json.loads(rest[-1]) if rest[-1] != "[DONE]" else json.loads(rest[-2])
        assert ("error" in last and "cancelled after serve.drain_s=1 s" in last["error"]["message"]
                or last["choices"][0]["finish_reason"] is not None)
        assert server.wait(120) == [0, 0], server.log()[-3000:]
        assert "Traceback" not in server.log() + server.log(1)
        assert _closed(server.port, 30)
    finally:
        server.stop()


def test_a_dead_rank_gives_503_and_a_nonzero_exit(gqa_ckpt, tmp_path):
    """(First, on the same world: resident contexts beyond serve.max_resident_tokens go, least recently used
    first.) A killed rank: the request in flight gets a 503, rank 0 exits non-zero naming it, the port closes."""
    server = Server(2, [f"checkpoint.hf_path={gqa_ckpt}", *TINY, "serve.max_resident_tokens=100"], tmp_path)
    try:
        server.wait_ready()
        reused = []
        for ctx in (1, 1, 2, 1, 3, 3):  # 60-token contexts: two do not fit in 100 resident tokens
            body = {"context": [ctx] * 60, "prompt": [5], "max_tokens": 1}
            reused.append(httpx.post(server.url + "/v1/completions", json=body, timeout=120).json()["usage"]
                          ["context_reused"])
        assert reused == [False, True, False, False, False, True]
        server.signal(signal.SIGKILL, ranks=[1])
        r = httpx.post(server.url + "/v1/completions", timeout=120,
                       json={"context": [1, 2, 3], "prompt": [4], "max_tokens": 2})
        assert r.status_code == 503
        assert r.json()["error"]["type"] == "service_unavailable"
        code = server.wait(120)[0]
        assert code not in (0, None)
        assert "rank 1" in server.log() and "star-mcore: error:" in server.log()
        assert _closed(server.port, 30)
    finally:
        server.stop()


def test_bad_serve_config_is_one_line():
    res = star_mcore("serve", "--config", CONFIG, "checkpoint.hf_path=x", "serve.port=70000")
    assert res.returncode == 2
    assert res.stderr.strip() == "star-mcore: error: serve.port must be in [0, 65535], got 70000"


def test_bench_serve_smoke(tmp_path):
    """scripts/bench_serve.py --smoke: the whole benchmark (server, client process, TTFT, load) on CPU."""
    out = tmp_path / "serve.json"
    res = subprocess.run([sys.executable, str(ROOT / "scripts" / "bench_serve.py"), "--smoke", "--out", str(out)],
                         capture_output=True, text=True, timeout=300, cwd=ROOT,
                         env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1",
                                  MASTER_PORT=str(free_port())))
    assert res.returncode == 0, res.stderr[-3000:]
    got = json.loads(out.read_text())
    assert got["load"]["requests"] == 4 and got["load"]["generated_tokens"] == 16 and got["load"]["reused"] == 2
    assert len(got["ttft_new_s"]) == len(got["ttft_resident_s"]) == 1


def test_openai_fields_become_generate_fields():
    """The mapping alone (no server): budget, sampling, logprobs of both endpoints."""
    from star_mcore.serve.openai_api import ApiError, chat_request, completion_request

    class Tok:
        def encode_messages(self, turns):
            return [1, 2], [3]

    chat = {"messages": [{"role": "user", "content": [{"type": "text", "text": "q"}]}], "max_completion_tokens": 5}
    assert chat_request(chat, "m", Tok()) == {"tokens_to_generate": 5, "context_ids": [1, 2], "query_ids": [3]}
    assert chat_request(dict(chat, logprobs=True), "m", Tok())["logprobs"] == 1
    assert chat_request(dict(chat, logprobs=True, top_logprobs=3), "m", Tok())["logprobs"] == 3
    with pytest.raises(ApiError, match="top_logprobs needs logprobs: true"):
        chat_request(dict(chat, top_logprobs=3), "m", Tok())
    assert completion_request({"prompt": ["q"], "context": "c", "seed": 4, "stop": "\n", "logprobs": 2}, "m") == {
        "context": "c", "query": "q", "seed": 4, "stop": "\n", "logprobs": 2}


def test_a_port_in_use_stops_the_start_with_one_line(gqa_ckpt):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        res = subprocess.run(
            [sys.executable, "-m", "star_mcore", "serve", "--config", CONFIG, f"checkpoint.hf_path={gqa_ckpt}",
             "model.context_parallel_size=1", "inference.context_parallel_mode=none", "serve.kv_pool_tokens=1024",
             f"serve.port={port}"], capture_output=True, text=True, timeout=300, cwd=ROOT,
            env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), MASTER_ADDR="127.0.0.1",
                     MASTER_PORT=str(free_port())))
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == (
        f"star-mcore: error: serve.host=127.0.0.1 serve.port={port}: cannot listen there (Address already in use)")
