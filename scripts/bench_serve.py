"""``star-mcore serve`` under load, through HTTP: time to first token for a question over a new context (phase 1
+ query pass) and over a resident one (query pass only), and generated tokens/s while ``--contexts`` contexts
with ``--questions`` questions each are asked all at once. One GPU (CP 1), a Llama-shaped model with random bf16
weights; the server is the real one (the front end process, the serving loop, the continuous batch); the load
comes from a client process of its own (streaming completions over token ids, first token = first event).

    python scripts/bench_serve.py --out docs/bench/serve.json
    python scripts/bench_serve.py --smoke --out /tmp/x.json     # CPU check of the script, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def client(args) -> None:
    """The load (a process apart from the server): warm-up, then TTFT new vs resident, then the bounded load."""
    import random

    import httpx

    rng = random.Random(0)
    ids = lambda n: [rng.randrange(args.vocab) for _ in range(n)]  # noqa: E731
    url = args.url + "/v1/completions"

    def ask(context, query, tokens):
        """(seconds to the first token, seconds to the end, tokens, context reused) of one streamed request."""
        body = {"context": context, "prompt": query, "max_tokens": tokens, "stream": True,
                "stream_options": {"include_usage": True}}
        t0 = time.perf_counter()
        first, n, reused = None, 0, None
        with httpx.Client(timeout=600) as c, c.stream("POST", url, json=body) as r:
            if r.status_code != 200:
                raise RuntimeError(f"HTTP {r.status_code}: {r.read()[:500]}")
            for line in r.iter_lines():
                if not line.startswith("data: {"):
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    raise RuntimeError(event["error"]["message"])
                if event.get("usage"):
                    reused = event["usage"]["context_reused"]
                elif event["choices"][0]["token_ids"]:
                    first = first or time.perf_counter() - t0
                    n += len(event["choices"][0]["token_ids"])
        return first, time.perf_counter() - t0, n, reused

    out = {}
    ask(ids(min(args.context, 4096)), ids(args.query), 4)  # warm-up: kernels, the decode step's graph
    new, resident = [], []
    for _ in range(args.repeats):
        ctx = ids(args.context)
        new.append(ask(ctx, ids(args.query), args.new_tokens))
        resident.append(ask(ctx, ids(args.query), args.new_tokens))
    assert all(not r[3] for r in new) and all(r[3] for r in resident), "resident contexts were not reused"
    out["ttft_new_s"] = [r[0] for r in new]
    out["ttft_resident_s"] = [r[0] for r in resident]
    # the bounded load: every question of every context at once (each context new to the server)
    contexts = [ids(args.context) for _ in range(args.contexts)]
    jobs = [(c, ids(args.query)) for c in contexts for _ in range(args.questions)]
    results = [None] * len(jobs)

    def run(i):
        results[i] = ask(jobs[i][0], jobs[i][1], args.new_tokens)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    assert all(r is not None for r in results), "a request of the load failed"
    out["load"] = dict(requests=len(jobs), wall_s=wall, generated_tokens=sum(r[2] for r in results),
                       tokens_per_s=sum(r[2] for r in results) / wall, ttft_s=[r[0] for r in results],
                       latency_s=[r[1] for r in results], reused=sum(bool(r[3]) for r in results))
    Path(args.out).write_text(json.dumps(out))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shape", default="llama3.1-8b")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--mode", default="star", help="star: blocks (and anchor) of context/8 on the one host")
    ap.add_argument("--context", type=int, default=32768)
    ap.add_argument("--contexts", type=int, default=4, help="contexts of the load")
    ap.add_argument("--questions", type=int, default=4, help="questions per context of the load, asked at once")
    ap.add_argument("--repeats", type=int, default=3, help="TTFT samples, new and resident")
    ap.add_argument("--query", type=int, default=32)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--smoke", action="store_true", help="tiny shape, short contexts: checks the script anywhere")
    ap.add_argument("--client", action="store_true", help=argparse.SUPPRESS)  # the load's own process
    ap.add_argument("--url", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.client:
        return client(args)
    if args.smoke:
        args.shape, args.layers, args.context, args.contexts, args.questions = "tiny", 2, 256, 2, 2
        args.repeats, args.query, args.new_tokens = 1, 4, 4

    import benchlib
    import torch

    from star_mcore.config import RunConfig
    from star_mcore.inference.engine import Engine
    from star_mcore.inference.requests import Tokenizer
    from star_mcore.inference.runner import Session
    from star_mcore.serve.loop import ServeLoop, start_frontend

    benchlib.env_flags()
    kind = benchlib.device_kind(args.device)
    groups = benchlib.setup(kind)
    vocab = 1000 if args.shape == "tiny" else 128256
    model = benchlib.layer_model(args.shape, groups, "bf16" if kind == "cuda" else "fp32", layers=args.layers,
                                 vocab=vocab)
    cfg = RunConfig()
    cfg.checkpoint.hf_path = "random"
    cfg.trainer.accelerator = "gpu" if kind == "cuda" else "cpu"
    inf = cfg.inference
    inf.context_parallel_mode, inf.block_size = args.mode, -(-args.context // 8)
    inf.anchor_size = inf.block_size
    inf.max_batch_size = args.contexts * args.questions
    inf.decode = "graph" if kind == "cuda" else "static"
    cfg.serve.port = 0  # any free port
    # every context of the load, two of the TTFT runs and the warm-up, with their questions' own tokens
    cfg.serve.kv_pool_tokens = (args.contexts + 3) * args.context + inf.max_batch_size * (args.query + args.new_tokens
                                                                                          + inf.kv_page_size)
    engine = Engine(model, groups, inf, ())
    notokenizer = tempfile.mkdtemp()  # token ids only
    session = Session(model.arch, groups, engine, Tokenizer(notokenizer), writer=True)
    proc, conn, port = start_frontend(cfg, vocab, model.arch.max_position_embeddings, notokenizer)
    client_out = Path(tempfile.mkdtemp()) / "client.json"
    load = subprocess.Popen([sys.executable, __file__, "--out", str(client_out), "--client",
                             "--url", f"http://127.0.0.1:{port}", "--vocab", str(vocab)]
                            + [f"--{k}={getattr(args, k.replace('-', '_'))}" for k in
                               ("context", "contexts", "questions", "repeats", "query", "new-tokens")])
    # the serving loop stops (SIGTERM's drain) when the client is done
    threading.Thread(target=lambda: (load.wait(), os.kill(os.getpid(), signal.SIGTERM)), daemon=True).start()
    pages = 1 + -(-cfg.serve.kv_pool_tokens // inf.kv_page_size)
    ServeLoop(cfg, session, conn).run(pages)
    conn.send(("exit",))
    proc.wait(timeout=60)
    if load.returncode != 0 or not client_out.exists():
        raise SystemExit(f"bench_serve: the load client failed (exit {load.returncode})")
    res = json.loads(client_out.read_text())
    med = statistics.median
    payload = dict(hardware=benchlib.hardware(), shape=args.shape, layers=args.layers, mode=args.mode,
                   context=args.context, query_tokens=args.query, new_tokens=args.new_tokens,
                   max_batch_size=inf.max_batch_size, decode=inf.decode, **res)
    print(f"TTFT new context {med(res['ttft_new_s']):.3f} s, resident {med(res['ttft_resident_s']):.3f} s "
          f"(median of {args.repeats}); load {res['load']['requests']} requests ({args.contexts} contexts x "
          f"{args.questions} questions, {args.context} tokens each): {res['load']['tokens_per_s']:.1f} tokens/s, "
          f"TTFT median {med(res['load']['ttft_s']):.3f} s", flush=True)
    if kind == "cuda":
        payload["max_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    benchlib.write_json(args.out, payload)


if __name__ == "__main__":
    main()
