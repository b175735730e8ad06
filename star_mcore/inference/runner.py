"""``star-mcore generate`` and the set-up every command that runs the model shares: checks, process groups,
model, engine, the watchdog and the one-line failure path."""

from __future__ import annotations

import os
import sys
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from ..config import RunConfig
from ..errors import ConfigError, RunError, UserError
from ..model.arch import LlamaArch
from ..model.checkpoint import open_checkpoint
from ..model.llama import StarLlama
from ..parallel.groups import ParallelGroups, destroy_parallel, init_process_group, initialize_parallel
from ..parallel.watchdog import Watchdog
from .engine import ContextReuse, Engine
from .logs import log
from .planner import check_fits
from .preflight import longest_request, preflight
from .requests import IdTracker, RequestError, ResultWriter, Tokenizer, parse_request, read_lines


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
def open_session(cfg: RunConfig, arch: LlamaArch) -> Iterator[Session]:
    """Watchdog, process groups, model and engine for ``cfg`` (after ``preflight``). A failure inside ends
    this rank with one line and makes every other rank exit naming it; a clean exit tears down together."""
    inf = cfg.inference
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    watchdog = Watchdog(rank, world, stale_after_s=cfg.distributed.heartbeat_timeout_s).start()
    try:
        device = init_process_group(cfg.trainer.accelerator, cfg.distributed.timeout_s)
        groups = initialize_parallel(cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size,
                                     device, cfg.distributed.timeout_s)
        model = StarLlama(arch, groups, cfg.model.precision)
        ckpt = open_checkpoint(cfg.checkpoint)  # HF or Megatron: the loader and tokenizer of the checkpoint
        ckpt.load(model, groups.tp_rank, groups.tp.size())
        engine = Engine(model, groups, inf, arch.eos_token_ids)
        yield Session(arch, groups, engine, Tokenizer(ckpt.tokenizer_dir, chat=inf.apply_chat_template),
                      writer=groups.is_query_host and groups.tp_rank == 0)
    except Exception as e:  # noqa: BLE001 - any failure on this rank, inside the session
        _fail(watchdog, rank, e)
    watchdog.stop()
    dist.barrier()
    destroy_parallel()


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
    longest = longest_request(cfg, arch)
    if longest is not None:
        check_fits(cfg, arch, *longest)
    with open_session(cfg, arch) as s:
        tokenizer, engine = s.tokenizer, s.engine
        ids = IdTracker(inf.output_path)  # every rank reads it before the writer appends: same skips
        dist.barrier()
        writer = ResultWriter(inf.output_path) if s.writer else None
        if writer is not None and ids.finished:
            log(f"resuming: {ids.finished} request(s) already in {inf.output_path} are skipped")
        n_ok = n_err = 0
        contexts = ContextReuse(engine)  # consecutive requests over one context: one phase 1
        for line_no, line in read_lines(inf.input_path):
            req = parse_request(line, line_no, tokenizer, arch.vocab_size, arch.max_position_embeddings,
                                inf.tokens_to_generate)
            if not ids.admit(req, line_no):
                continue
            if req.error is None:
                try:
                    gen = contexts.generate(torch.tensor(req.context_ids), torch.tensor(req.query_ids),
                                            save_logits=inf.save_logits)
                except RequestError as e:  # raised the same way on every rank
                    req.error = str(e)
            if req.error is not None:
                record = {"id": req.id, "error": req.error}
                n_err += 1
            else:
                record = {"id": req.id, "generated_ids": gen.generated_ids}
                if req.text:
                    record["text"] = tokenizer.decode(gen.generated_ids)
                if gen.first_step_logits is not None:
                    record["first_step_logits"] = gen.first_step_logits.tolist()
                record.update(gen.timings)
                record["context_reused"] = gen.context_reused
                n_ok += 1
            if writer is not None:
                writer.write(record)
                log(f"request {req.id}: " + (f"error: {req.error}" if req.error else
                    f"{len(req.context_ids)} context + {len(req.query_ids)} query tokens, "
                    f"phase1 {record['phase1_s']:.3f}s, phase2 {record['phase2_s']:.3f}s"))
        if writer is not None:
            writer.close()
            log(f"done: {n_ok} answered, {n_err} with errors -> {inf.output_path}")
    return 0
