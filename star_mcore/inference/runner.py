"""``star-mcore generate`` and the set-up every command that runs the model shares: checks, process groups,
model, engine, the watchdog and the one-line failure path."""

from __future__ import annotations

import os
import signal
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Optional

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..errors import ConfigError, RunError, UserError
from ..model.arch import LlamaArch
from ..model.checkpoint import open_checkpoint
from ..model.llama import StarLlama
from ..parallel.groups import ParallelGroups, destroy_parallel, init_process_group, initialize_parallel
from ..parallel.watchdog import Watchdog
from .batch import ContinuousBatch, Job
from .engine import Engine, Generation, Sampling
from .logs import log
from .planner import check_fits, kv_pool_pages
from .preflight import preflight
from .requests import (IdTracker, Request, ResultWriter, Tokenizer, answer_text, id_key, parse_request,
                       put_in_input_order, read_lines, resolved_seed)


def is_communication_error(e: BaseException) -> bool:
    """A collective or p2p failed (peer gone, connection reset, timeout), rather than this rank's own code."""
    dist_error = getattr(dist, "DistError", None)
    if dist_error is not None and isinstance(e, dist_error):
        return True
    text = str(e)
    return any(s in text for s in ("gloo", "NCCL", "Connection reset", "Connection closed", "Broken pipe"))


@dataclass
class Session:
    """A started run: this rank's groups, the loaded model's engine and the checkpoint's tokenizer."""

    arch: LlamaArch
    groups: ParallelGroups
    engine: Engine
    tokenizer: Tokenizer
    writer: bool  # the one rank that writes results: the query host's TP rank 0


def _fail(watchdog: Watchdog, rank: int, e: Exception) -> None:
    """This rank cannot go on: tell the others (so they exit naming it), print one line, leave at once."""
    if is_communication_error(e):
        # Most likely a peer died or failed first: give the watchdog the time it needs to name it
        # (it ends this process when it does) rather than blaming this rank.
        watchdog.wait_for_verdict()
    watchdog.report_failure(f"{type(e).__name__}: {e}")
    debug = bool(os.environ.get("STAR_MCORE_DEBUG"))
    if debug:
        traceback.print_exc()
    if isinstance(e, UserError):
        print(f"star-mcore: error: {e}", file=sys.stderr, flush=True)
    else:
        print(f"star-mcore: error: rank {rank}: {type(e).__name__}: {e}"
              + ("" if debug else " (STAR_MCORE_DEBUG=1 shows the traceback)"), file=sys.stderr, flush=True)
    os._exit(2 if isinstance(e, UserError) else 1)  # peers may be blocked in collectives with us


@contextmanager
def open_session(cfg: RunConfig, arch: LlamaArch, tokenizer: Optional[Tokenizer] = None) -> Iterator[Session]:
    """Watchdog, process groups, model and engine for ``cfg`` (after ``preflight``). A failure inside ends
    this rank with one line and makes every other rank exit naming it; a clean exit tears down together."""
    inf = cfg.inference
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    watchdog = Watchdog(rank, world, stale_after_s=cfg.distributed.heartbeat_timeout_s).start()
    try:
        device = init_process_group(cfg.trainer.accelerator, cfg.distributed.timeout_s)
        groups = initialize_parallel(cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size,
                                     device, cfg.distributed.timeout_s)
        model = StarLlama(arch, groups, cfg.model.precision, cfg.model.transformer_impl)
        ckpt = open_checkpoint(cfg.checkpoint)  # HF or Megatron: the loader and tokenizer of the checkpoint
        ckpt.load(model, groups.tp_rank, groups.tp.size())
        engine = Engine(model, groups, inf, arch.eos_token_ids)
        tokenizer = tokenizer or Tokenizer(ckpt.tokenizer_dir, chat=inf.apply_chat_template)
        yield Session(arch, groups, engine, tokenizer, writer=groups.is_query_host and groups.tp_rank == 0)
    except Exception as e:  # noqa: BLE001 - any failure on this rank, inside the session
        _fail(watchdog, rank, e)
    watchdog.stop()
    dist.barrier()
    destroy_parallel()


def request_job(req: Request, inf, tokenizer: Tokenizer, tag) -> Job:
    """The batch's job for a parsed request (the same on every rank); ``tag`` comes back with its outcome."""
    sampling = Sampling(req.tokens_to_generate, req.temperature, req.top_k, req.top_p,
                        resolved_seed(req, inf.sampling.seed), req.stop_token_ids, req.logprobs)
    stopped = None
    if req.stop:
        stopped = lambda ids: any(x in tokenizer.decode(ids) for x in req.stop)  # noqa: E731
    return Job(torch.tensor(req.context_ids), torch.tensor(req.query_ids), sampling, save_logits=inf.save_logits,
               stopped=stopped, tag=tag)


def _record(req: Request, out, tokenizer: Tokenizer) -> dict:
    """The output line of a request: its error, or its tokens, why it ended, text, log-probs and timings."""
    if not isinstance(out, Generation):
        return {"id": req.id, "error": str(out)}
    record = {"id": req.id, "generated_ids": out.generated_ids, "finish_reason": out.finish_reason}
    if req.text or req.stop:
        record["text"] = answer_text(tokenizer, out.generated_ids, req)
    if out.logprobs is not None:
        record["logprobs"] = out.logprobs
    if out.first_step_logits is not None:
        record["first_step_logits"] = out.first_step_logits.tolist()
    record.update(out.timings)
    record["context_reused"] = out.context_reused
    return record


def run_generation(cfg: RunConfig) -> int:
    inf = cfg.inference
    for key in ("input_path", "output_path"):
        if not getattr(inf, key):
            raise ConfigError(f"inference.{key} is required for generate")
    if not Path(inf.input_path).is_file():
        raise RunError(f"inference.input_path={inf.input_path}: file not found")
    if Path(inf.output_path).is_dir():
        raise RunError(f"inference.output_path={inf.output_path}: is a directory, not a file")
    arch = preflight(cfg)
    tokenizer = Tokenizer(open_checkpoint(cfg.checkpoint).tokenizer_dir, chat=inf.apply_chat_template)
    # Every rank parses every line the same way, before anything starts: the batch's decisions depend on them.
    requests = [(n, parse_request(line, n, tokenizer, arch.vocab_size, arch.max_position_embeddings, inf))
                for n, line in read_lines(inf.input_path)]
    valid = [r for _, r in requests if r.error is None]
    pages = 2
    if valid:
        longest = max(valid, key=lambda r: len(r.context_ids) + len(r.query_ids) + r.tokens_to_generate)
        check_fits(cfg, arch, len(longest.context_ids), len(longest.query_ids), longest.tokens_to_generate)
        pages = kv_pool_pages(cfg, arch, [(tuple(r.context_ids), len(r.context_ids),
                                           len(r.query_ids) + r.tokens_to_generate) for r in valid])
    with open_session(cfg, arch, tokenizer) as s:
        engine = s.engine
        ids = IdTracker(inf.output_path)  # every rank reads it before the writer appends: same skips
        dist.barrier()
        writer = ResultWriter(inf.output_path) if s.writer else None
        if writer is not None and ids.finished:
            log(f"resuming: {ids.finished} request(s) already in {inf.output_path} are skipped")
        counts = {"answered": 0, "errors": 0}

        def emit(req: Request, out) -> None:
            record = _record(req, out, tokenizer)
            counts["errors" if "error" in record else "answered"] += 1
            if writer is not None:
                writer.write(record)
                log(f"request {req.id}: " + (f"error: {record['error']}" if "error" in record else
                    f"{len(req.context_ids)} context + {len(req.query_ids)} query tokens, "
                    f"{len(record['generated_ids'])} generated ({record['finish_reason']}), "
                    f"phase1 {record['phase1_s']:.3f}s, phase2 {record['phase2_s']:.3f}s"))

        def jobs():
            for line_no, req in requests:
                if not ids.admit(req, line_no):
                    continue
                if req.error is not None:
                    emit(req, req.error)
                else:
                    yield request_job(req, inf, tokenizer, (line_no, req))

        # SIGTERM (a scheduler's preemption, scancel): admit nothing more, finish what runs, keep every line
        stopped = []
        previous = signal.signal(signal.SIGTERM, lambda *_: stopped.append(True))
        try:
            finished = ContinuousBatch(engine).run(jobs(), lambda job, out: emit(job.tag[1], out), pages=pages,
                                                   stop=lambda: bool(stopped))
        finally:
            signal.signal(signal.SIGTERM, previous)
        if writer is not None:
            writer.close()
            put_in_input_order(inf.output_path, [id_key(r.id) for _, r in requests])
            log(f"done: {counts['answered']} answered, {counts['errors']} with errors -> {inf.output_path}")
    if not finished:
        if s.writer:
            print("star-mcore: stopped by SIGTERM: the running requests were finished and written; rerun with the "
                  f"same inference.output_path={inf.output_path} to answer the rest", file=sys.stderr, flush=True)
        return 143
    return 0
