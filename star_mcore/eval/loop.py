"""``star-mcore eval ruler|babilong``: every (task, length, sample) through the engine, one JSON line each.

Every rank builds the same samples (the generators are seeded) and runs them through the continuous batch in the
configured mode (greedy: each sample gets what it gets alone); the writer rank appends one line per finished
sample, as it finishes, and flushes it. A rerun with the same
``eval.output_path`` skips the samples that file already holds for the same setting, so an interrupted run
resumes without redoing or losing samples.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Dict, List, Set, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from ..config import RunConfig
from ..errors import ConfigError, RunError
from ..inference.batch import ContinuousBatch, Job
from ..inference.engine import Generation, Sampling
from ..inference.planner import kv_pool_pages
from ..inference.requests import ResultWriter, read_records
from ..inference.runner import log, open_session, preflight
from ..model.checkpoint import open_checkpoint
from ..ops.layout import star_layout
from .settings import complete_setting, setting_of
from .tasks import Task, select
from .text import TooShort

Key = Tuple[str, int, int]  # (task, length, sample index)

def read_done(path: str, setting: Dict[str, Any]) -> Set[Key]:
    """The samples ``path`` already holds for ``setting``; a line cut short by an interrupted run is ignored."""
    return {(r["task"], r["length"], r["sample"]) for r in read_records(path)
            if complete_setting(r.get("setting") or {}) == setting}


def blocks(cfg: RunConfig, context_len: int) -> int:
    """How many pieces phase 1 encoded the context in: star's blocks (whatever the hosts that ran them),
    otherwise 1 (global attention)."""
    inf = cfg.inference
    if inf.context_parallel_mode != "star":
        return 1
    return sum(len(h) for h in star_layout(context_len, inf.block_size, inf.anchor_size, inf.partition, 1))


def _tasks_and_data(cfg: RunConfig, benchmark: str) -> Tuple[List[Task], Dict[str, Any], List[str]]:
    ev = cfg.eval
    try:
        tasks = select(benchmark, ev.tasks)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    data: Dict[str, Any] = {}
    skipped: List[str] = []
    for t in tasks:
        if t.data_key is None:
            continue
        path = getattr(ev, t.data_key)
        if not path:
            skipped.append(f"{t.name} (no eval.{t.data_key})")
            continue
        if not Path(path).is_file():
            raise RunError(f"eval.{t.data_key}={path}: file not found")
        try:
            data[t.name] = t.loader(path)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise RunError(f"eval.{t.data_key}={path}: cannot read its questions ({type(e).__name__}: {e})") from None
        if not data[t.name].questions:
            raise RunError(f"eval.{t.data_key}={path}: no answerable question in it")
    tasks = [t for t in tasks if t.data_key is None or t.name in data]
    if not tasks:
        raise ConfigError(f"eval: no task left to run: {', '.join(skipped)}")
    return tasks, data, skipped


def run_eval(cfg: RunConfig, benchmark: str) -> int:
    ev = cfg.eval
    if not ev.output_path:
        raise ConfigError("eval.output_path is required for eval")
    tasks, data, skipped = _tasks_and_data(cfg, benchmark)
    arch = preflight(cfg)
    ckpt = Path(open_checkpoint(cfg.checkpoint).tokenizer_dir)
    if not any((ckpt / f).exists() for f in ("tokenizer.json", "tokenizer.model")):
        raise RunError(f"{ckpt}: eval writes text prompts and needs the checkpoint's tokenizer (tokenizer.json)")
    budget = {t.name: ev.tokens_to_generate or t.tokens_to_generate for t in tasks}
    longest = max(ev.lengths) + max(budget.values())
    if longest > arch.max_position_embeddings:
        raise RunError(f"eval.lengths up to {max(ev.lengths)} + {max(budget.values())} generated tokens exceed the "
                       f"model's max positions ({arch.max_position_embeddings})")
    setting = setting_of(cfg)
    with open_session(cfg, arch) as s:
        # Every rank reads the file before anyone appends; they must agree on what to skip or they would
        # run different samples and deadlock in the engine's collectives.
        done = read_done(ev.output_path, setting)
        agree = torch.tensor([len(done), -len(done)], device=s.groups.device)
        dist.all_reduce(agree, op=dist.ReduceOp.MAX)
        if int(agree[0]) != -int(agree[1]):
            raise RunError(f"eval.output_path={ev.output_path}: ranks see different files (put it on a filesystem "
                           "every rank shares)")
        dist.barrier()
        writer = ResultWriter(ev.output_path) if s.writer else None
        if writer and skipped:
            log(f"note: skipping {', '.join(skipped)}: give a local file to run it")
        tok = s.tokenizer
        total = len(tasks) * len(ev.lengths) * ev.samples
        bar = tqdm(total=total, disable=writer is None, desc=f"{benchmark} {setting['context_parallel_mode']}",
                   unit="sample", dynamic_ncols=True)
        scores: Dict[str, List[float]] = {}
        prompts = []  # (task, length, index, sample, context ids, query ids), in order
        for task in tasks:
            for length in ev.lengths:
                for i in range(ev.samples):
                    if (task.name, length, i) in done:
                        bar.update(1)
                        continue
                    try:
                        sample = task.make(ev.seed, i, length, tok, data=data.get(task.name))
                    except TooShort as e:
                        if writer:
                            log(f"note: {task.name} at {length} tokens skipped: {e}")
                        bar.update(ev.samples - i)
                        break
                    ctx, qry = tok.prompt(sample.context, sample.query)  # the chat template, if configured
                    if max(ctx + qry) >= arch.vocab_size:
                        raise RunError(f"{ckpt}: the tokenizer's ids exceed the model's vocabulary ({arch.vocab_size})")
                    prompts.append((task, length, i, sample, ctx, qry))

        def emit(job: Job, gen) -> None:
            task, length, i, sample, ctx = job.tag
            if not isinstance(gen, Generation):
                raise RunError(f"{task.name} at {length} tokens, sample {i}: {gen}")
            prediction = tok.decode(gen.generated_ids)
            score = task.score(prediction, sample.references)
            scores.setdefault(task.name, []).append(score)
            if writer:
                writer.write({"benchmark": benchmark, "task": task.name, "length": length, "sample": i,
                              "depth": sample.depth, "prompt_tokens": sample.tokens, "context_tokens": len(ctx),
                              "blocks": blocks(cfg, len(ctx)), "prediction": prediction,
                              "references": sample.references, "metric": task.metric, "score": score,
                              **gen.timings, "setting": setting})
            bar.update(1)
            bar.set_postfix(task=task.name, length=length,
                            mean=f"{100 * sum(scores[task.name]) / len(scores[task.name]):.1f}")

        # the samples decode together (inference.max_batch_size): greedy, so each gets what it would alone
        jobs = [Job(torch.tensor(ctx), torch.tensor(qry), Sampling(budget[task.name]),
                    tag=(task, length, i, sample, ctx)) for task, length, i, sample, ctx, qry in prompts]
        try:
            if jobs:
                pages = kv_pool_pages(cfg, arch, [j.footprint for j in jobs])
                ContinuousBatch(s.engine).run(jobs, emit, pages=pages)
        finally:
            bar.close()
            if writer:
                writer.close()
        if writer:
            n = sum(len(v) for v in scores.values())
            means = ", ".join(f"{t} {100 * sum(v) / len(v):.1f}" for t, v in scores.items())
            log(f"done: {n} new samples ({len(done)} already in the file) -> {ev.output_path}"
                + (f"; mean score of the new ones: {means}" if means else ""))
    return 0
