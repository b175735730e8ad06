"""Functions that run on every rank of a spawned world (see distributed.run_world)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch

from star_mcore.config import InferenceConfig
from star_mcore.inference.engine import Engine, NumericalError
from star_mcore.inference.kv_cache import KVPool
from star_mcore.inference.steps import EncodeSegment
from star_mcore.model.arch import LlamaArch
from star_mcore.model.hf_checkpoint import load_hf_llama
from star_mcore.model.llama import StarLlama
from star_mcore.ops import math_attention
from star_mcore.parallel.groups import destroy_parallel, init_process_group, initialize_parallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
from bench_e2e import star_phase2_error  # noqa: E402


def _setup(ckpt: str, tp: int, cp: int, precision: str = "fp32", accelerator: str = "cpu",
           transformer_impl: str = "local"):
    device = init_process_group(accelerator, 120)
    groups = initialize_parallel(tp, cp, device, 120)
    model = StarLlama(LlamaArch.from_hf_dir(ckpt), groups, precision, transformer_impl)
    load_hf_llama(model, ckpt, groups.tp_rank, tp)
    return groups, model


def load_footprint(ckpt: str, tp: int) -> dict:
    """A bf16 load watched twice: the elements of every slice the loader asked the checkpoint for, and the
    ops that allocated tensor memory during the load (torch profiler; mapping the files is not an op)."""
    from torch.profiler import ProfilerActivity, profile

    from star_mcore.model import hf_checkpoint

    device = init_process_group("cpu", 120)
    groups = initialize_parallel(tp, 1, device, 120)
    try:
        model = StarLlama(LlamaArch.from_hf_dir(ckpt), groups, "bf16")
        requested: List[list] = []
        read = hf_checkpoint.SafetensorsReader.read

        def spy(self, name, rows=None, cols=None):
            t = read(self, name, rows=rows, cols=cols)
            requested.append([name, t.numel()])
            return t

        hf_checkpoint.SafetensorsReader.read = spy
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            load_hf_llama(model, ckpt, groups.tp_rank, tp)
        allocating = sorted({e.name for e in prof.events() if e.cpu_memory_usage > 0 and e.name != "[memory]"})
        return {"requested": requested, "allocating_ops": allocating}
    finally:
        destroy_parallel()


def mapped_files_during_load(ckpt: str) -> dict:
    """A TP=1 load with every slice request watched: how many checkpoint files this process has mapped
    (/proc/self/maps) right after each request, and after the load."""
    from star_mcore.model import hf_checkpoint

    def mapped() -> int:
        with open("/proc/self/maps") as f:
            return len({line.split()[-1] for line in f if line.rstrip().endswith(".safetensors")})

    device = init_process_group("cpu", 120)
    groups = initialize_parallel(1, 1, device, 120)
    try:
        model = StarLlama(LlamaArch.from_hf_dir(ckpt), groups, "fp32")
        counts: List[int] = []
        read = hf_checkpoint.SafetensorsReader.read

        def spy(self, name, rows=None, cols=None):
            t = read(self, name, rows=rows, cols=cols)
            counts.append(mapped())
            return t

        hf_checkpoint.SafetensorsReader.read = spy
        load_hf_llama(model, ckpt, 0, 1)
        return {"during": counts, "after": mapped()}
    finally:
        destroy_parallel()


def battery(ckpt: str, tp: int, cp: int, cases: List[dict] = (), phase2: List[dict] = (),
            full_logits_ids: Optional[List[int]] = None, backend: str = "auto", precision: str = "fp32",
            kv_pairs: List[dict] = (), accelerator: str = "cpu", transformer_impl: str = "local",
            kept: List[dict] = ()) -> dict:
    """Everything one world checks, with one model load:
    - ``cases``: {name, mode, block, anchor, ctx, qry, n, eos?, anchor_mode?, partition?, star_context?,
      landmarks?: (count, size)} -> tokens (+ first-step logits where this rank has them)
    - ``phase2``: {name, ctx, qry, block, anchor} -> see :func:`star_phase2_vs_global`
    - ``full_logits_ids``: all-position logits of one causal forward (single rank)
    - ``kv_pairs``: {name, ctx, block, anchor, partition, star_context?} -> see :func:`shared_vs_recompute_kv`
    - ``kept``: star cases ({name, ctx, block, anchor, anchor_mode, partition, star_context, landmarks}) -> this
      rank's phase-1 KV, see :func:`kept_kv`.
    ``transformer_impl``: mcore's local layers or TransformerEngine's (GPU only)."""
    groups, model = _setup(ckpt, tp, cp, precision, accelerator, transformer_impl)
    res: Dict[str, Any] = {"cases": {}, "phase2": {}, "kv_pairs": {}, "kept": {},
                           "param_dtypes": sorted({str(p.dtype) for p in model.gpt.parameters()}),
                           # every tensor the model holds, each once (tied embeddings: one tensor, two uses)
                           "param_bytes": sum(p.numel() * p.element_size() for p in model.gpt.parameters()),
                           "output_layer_weight": model.gpt.output_layer.weight is not None}
    try:
        res.update(run_cases(groups, model, cases, full_logits_ids, backend))
        for c in kv_pairs:
            res["kv_pairs"][c["name"]] = shared_vs_recompute_kv(groups, model, c)
        for c in kept:
            res["kept"][c["name"]] = kept_kv(groups, model, c)
        for c in phase2:
            res["phase2"][c["name"]] = star_phase2_vs_global(groups, model, c["ctx"], c["qry"], c["block"], c["anchor"])
    finally:
        destroy_parallel()
    return res


def _pool(model, tokens: int, page: int = 16) -> KVPool:
    """A pool with room for ``tokens`` (this rank's KV heads), for workers that drive phase 1 directly."""
    tp = model.tp.size()
    return KVPool(model.arch.num_layers, 2 + -(-tokens // page), page, model.arch.num_kv_heads // tp,
                  model.arch.head_dim, model.dtype, model.device)


def run_cases(groups, model, cases: List[dict], full_logits_ids: Optional[List[int]] = None,
              backend: str = "auto") -> dict:
    """:func:`battery`'s ``cases`` and ``full_logits_ids`` on a loaded model: {"cases": ..., "full_logits"?}."""
    res: Dict[str, Any] = {"cases": {}}
    for c in cases:
        eng = Engine(model, groups, InferenceConfig(
            context_parallel_mode=c["mode"], block_size=c["block"], anchor_size=c["anchor"],
            tokens_to_generate=c["n"],
            attention_backend=backend, anchor_mode=c.get("anchor_mode", "shared"),
            partition=c.get("partition", "uniform"), decode=c.get("decode", "graph"),
            star_context=c.get("star_context", "anchor"), landmarks=c.get("landmarks", (4, 64))[0],
            landmark_size=c.get("landmarks", (4, 64))[1]), c.get("eos", ()))
        gen = eng.generate(torch.tensor(c["ctx"]), torch.tensor(c["qry"]), save_logits=True)
        r = {"tokens": gen.generated_ids}
        if gen.first_step_logits is not None:
            r["logits"] = gen.first_step_logits.tolist()
        res["cases"][c["name"]] = r
    if full_logits_ids is not None:
        ids = torch.tensor(full_logits_ids)
        seq = _pool(model, len(ids)).allocate(len(ids))
        with torch.inference_mode(), model.attending(EncodeSegment(math_attention, seq)):
            model.runtime.reset_guard(model.device)
            res["full_logits"] = model.logits(model.hidden(ids, torch.arange(len(ids)))).tolist()
    return res


def checkpoints_battery(checkpoints: List[dict], tp: int, cp: int, cases: List[dict] = (),
                        full_logits_ids: Optional[List[int]] = None, accelerator: str = "cpu",
                        transformer_impl: str = "local", backend: str = "auto") -> Dict[str, dict]:
    """:func:`run_cases` on each checkpoint ({name, config: CheckpointConfig fields}), opened and loaded as the
    runner does (``open_checkpoint``: HF or Megatron), in fp32, one world for all of them; with a Megatron
    checkpoint also ``requested``: the elements of the boxes this rank asked the checkpoint for.
    ``transformer_impl``: mcore's local layers or TransformerEngine's (GPU only)."""
    from star_mcore.config import CheckpointConfig
    from star_mcore.model import megatron_checkpoint
    from star_mcore.model.checkpoint import open_checkpoint

    requested: List[int] = []
    read = megatron_checkpoint.DcpCheckpoint.read

    def spy(self, boxes, wants):
        requested.append(sum(dest.numel() for _, _, dest in wants))
        return read(self, boxes, wants)

    megatron_checkpoint.DcpCheckpoint.read = spy
    groups = initialize_parallel(tp, cp, init_process_group(accelerator, 120), 120)
    out = {}
    try:
        for c in checkpoints:
            ckpt = open_checkpoint(CheckpointConfig(**c["config"]))
            model = StarLlama(ckpt.arch, groups, "fp32", transformer_impl)
            requested.clear()
            ckpt.load(model, groups.tp_rank, tp)
            out[c["name"]] = {**run_cases(groups, model, cases, full_logits_ids, backend),
                              "requested": sum(requested)}
    finally:
        destroy_parallel()
    return out


def preflight_error(config: str, overrides: List[str]) -> str:
    """This rank's one-line refusal from the runner's checks before any process group (or "" if none)."""
    from star_mcore.config import load_config
    from star_mcore.errors import UserError
    from star_mcore.inference.preflight import preflight

    try:
        preflight(load_config(config, overrides))
    except UserError as e:
        return str(e)
    return ""


def shared_vs_recompute_kv(groups, model, c: dict) -> dict:
    """Phase 1 with the anchor shared and recomputed: this rank's KV caches must hold the same tokens
    and agree to fp32 rounding. Returns {tokens held, max |difference|}."""
    caches = {}
    for mode in ("shared", "recompute"):
        eng = Engine(model, groups, InferenceConfig(block_size=c["block"], anchor_size=c["anchor"],
                                                    tokens_to_generate=1, anchor_mode=mode, partition=c["partition"],
                                                    star_context=c.get("star_context", "anchor"),
                                                    landmarks=2, landmark_size=2))
        caches[mode] = _pool(model, len(c["ctx"])).allocate(len(c["ctx"]))
        eng.prefill(torch.tensor(c["ctx"]), caches[mode])
    like = torch.empty(1, 1, 0, 1)
    worst, held = 0.0, len(caches["shared"])
    assert held == len(caches["recompute"])
    for layer in range(model.arch.num_layers):
        for a, b in zip(caches["shared"].get(layer, like), caches["recompute"].get(layer, like)):
            assert a.shape == b.shape
            if a.numel():
                worst = max(worst, (a - b).abs().max().item())
    return {"held": held, "max_diff": worst}


def kept_kv(groups, model, c: dict) -> List[List[list]]:
    """Star phase 1 of ``c["ctx"]`` alone: this rank's KV cache, per layer [k, v] as nested lists [hk / tp, n, d]."""
    eng = Engine(model, groups, InferenceConfig(
        block_size=c["block"], anchor_size=c["anchor"], tokens_to_generate=1, anchor_mode=c["anchor_mode"],
        partition=c["partition"], star_context=c["star_context"], landmarks=c["landmarks"][0],
        landmark_size=c["landmarks"][1]))
    seq = _pool(model, len(c["ctx"])).allocate(len(c["ctx"]))
    eng.prefill(torch.tensor(c["ctx"]), seq)
    like = torch.empty(1, model.arch.num_kv_heads // groups.tp.size(), 0, model.arch.head_dim)  # a host with none
    return [[t[0].tolist() for t in seq.get(layer, like)] for layer in range(model.arch.num_layers)]


def star_phase2_vs_global(groups, model, ctx: List[int], qry: List[int], block: int, anchor: int) -> float:
    """Star phase 1, then one phase-2 pass; per layer and on every host, the merged attention output against
    global attention (one softmax) over the union of every host's KV plus the query's own causally
    (scripts/bench_e2e.py's check). Returns the largest absolute difference over all ranks."""
    eng = Engine(model, groups, InferenceConfig(block_size=block, anchor_size=anchor, tokens_to_generate=1,
                                                attention_backend="sdpa_flash"))
    return star_phase2_error(eng, torch.tensor(ctx), torch.tensor(qry))


def cache_freed_after_generate(ckpt: str) -> List[bool]:
    """After each request, and after one that fails, no step (and so no KV sequence) is kept by the model, and
    every page of the pool is free again."""
    groups, model = _setup(ckpt, 1, 2)
    eng = Engine(model, groups, InferenceConfig(block_size=8, anchor_size=4, tokens_to_generate=2, kv_page_size=4))
    seen = []
    free = lambda: eng.pool.free_pages == eng.pool.pages - 1  # noqa: E731
    try:
        eng.generate(torch.arange(20), torch.tensor([3, 4]))
        seen.append(model.runtime.step is None and free())
        with torch.no_grad():  # a NaN weight makes the request fail with NumericalError
            model.gpt.decoder.layers[0].self_attention.linear_qkv.weight[0, 0] = float("nan")
        try:
            eng.generate(torch.arange(20), torch.tensor([3, 4]))
        except NumericalError:
            seen.append(model.runtime.step is None and free())
        import weakref

        seq = _pool(model, 4).allocate(4)
        ref = weakref.ref(seq)
        with model.attending(EncodeSegment(math_attention, seq)):
            del seq
            seen.append(ref() is not None)  # the checks above are meaningful: a step does keep its sequence alive
        seen.append(ref() is None)  # ... and leaving the block drops it
    finally:
        destroy_parallel()
    return seen


def _job(spec: dict):
    from star_mcore.inference.batch import Job
    from star_mcore.inference.engine import Sampling

    sampling = Sampling(spec["n"], spec.get("temperature", 0.0), spec.get("top_k", 0), spec.get("top_p", 1.0),
                        spec.get("seed", 0), tuple(spec.get("stop_token_ids", ())), spec.get("logprobs", 0))
    return Job(torch.tensor(spec["ctx"]), torch.tensor(spec["qry"]), sampling, save_logits=True, tag=spec["tag"])


def _outcome(out) -> dict:
    if isinstance(out, Exception):
        return {"error": str(out)}
    return {"tokens": out.generated_ids, "finish": out.finish_reason, "reused": out.context_reused,
            "logits": None if out.first_step_logits is None else out.first_step_logits.tolist(),
            "logprobs": out.logprobs}


def batch_vs_alone(ckpt: str, tp: int, cp: int, variants: List[dict], jobs: List[dict], loops=("eager", "static"),
                   max_batch: int = 3, page: int = 4, poison_step_of: Optional[str] = None, precision: str = "fp32",
                   accelerator: str = "cpu") -> dict:
    """For each variant ({name, mode, block, anchor}) and decode loop: ``jobs`` ({tag, ctx, qry, n, sampling
    fields}) run through one ContinuousBatch of ``max_batch`` slots, and each alone (Engine.generate): tokens,
    finish reasons, first-step logits (query host), log-probs, context_reused, errors; and how many steps ran.
    ``poison_step_of``: afterwards, the first generated token of that job gets an inf embedding (its first decode
    step then fails; the test checks no other job feeds it) and the batch runs again. ``captures``/``replays``:
    the graph loop's counts after the batch, and after the alone runs on the same engine."""
    from star_mcore.inference.batch import ContinuousBatch

    groups, model = _setup(ckpt, tp, cp, precision, accelerator)
    res: Dict[str, Any] = {}
    try:
        for v in variants:
            for loop in loops:
                eng = Engine(model, groups, InferenceConfig(
                    context_parallel_mode=v["mode"], block_size=v["block"], anchor_size=v["anchor"], decode=loop,
                    max_batch_size=max_batch, kv_page_size=page), v.get("eos", ()))
                out: Dict[str, Any] = {}
                ContinuousBatch(eng).run([_job(j) for j in jobs], lambda j, o: out.__setitem__(j.tag, _outcome(o)))
                captures, replays = getattr(eng.decoder, "captures", 0), getattr(eng.decoder, "replays", 0)
                alone = {}
                for j in jobs:
                    try:
                        alone[j["tag"]] = _outcome(eng.generate(torch.tensor(j["ctx"]), torch.tensor(j["qry"]), True,
                                                                sampling=_job(j).sampling))
                    except NumericalError as e:
                        alone[j["tag"]] = _outcome(e)
                res[f"{v['name']}/{loop}"] = {"batch": out, "alone": alone,
                                              "free": eng.pool.free_pages == eng.pool.pages - 1,
                                              "captures": [captures, getattr(eng.decoder, "captures", 0)],
                                              "replays": [replays, getattr(eng.decoder, "replays", 0)]}
        if poison_step_of is not None:
            first = res[f"{variants[0]['name']}/{loops[0]}"]["batch"][poison_step_of]["tokens"][0]
            with torch.no_grad():
                model.gpt.embedding.word_embeddings.weight[first] = float("inf")
            for loop in loops:
                v = variants[0]
                eng = Engine(model, groups, InferenceConfig(
                    context_parallel_mode=v["mode"], block_size=v["block"], anchor_size=v["anchor"], decode=loop,
                    max_batch_size=max_batch, kv_page_size=page))
                out = {}
                ContinuousBatch(eng).run([_job(j) for j in jobs], lambda j, o: out.__setitem__(j.tag, _outcome(o)))
                res[f"poisoned/{loop}"] = {"batch": out, "token": first}
    finally:
        destroy_parallel()
    return res
