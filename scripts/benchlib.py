"""Shared pieces of the benchmarks: model shapes, a one-GPU set-up with the real model code, timing."""

from __future__ import annotations

import json
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Dict

import torch

from star_mcore.model.arch import LlamaArch
from star_mcore.model.llama import StarLlama
from star_mcore.parallel.groups import ParallelGroups, init_process_group, initialize_parallel

# Per-layer shapes of the paper's models (TP = 1: a host's work on one GPU; TP divides it further).
SHAPES: Dict[str, dict] = {
    "llama3.1-8b": dict(hidden_size=4096, intermediate_size=14336, num_heads=32, num_kv_heads=8, head_dim=128,
                        layers=32),
    "llama3.1-70b": dict(hidden_size=8192, intermediate_size=28672, num_heads=64, num_kv_heads=8, head_dim=128,
                         layers=80),
    "tiny": dict(hidden_size=64, intermediate_size=128, num_heads=4, num_kv_heads=2, head_dim=16, layers=2),
}
BF16_PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}  # dense bf16 tensor-core peak (SXM datasheet)


def common_args(ap) -> None:
    """The options every model benchmark takes."""
    ap.add_argument("--out", required=True)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--shapes", default="llama3.1-8b,llama3.1-70b")
    ap.add_argument("--backend", default="auto")
    ap.add_argument("--smoke", action="store_true", help="tiny shape and lengths: checks the script on any device")


def setup(device_kind: str) -> ParallelGroups:
    """A world of one process (the benchmarks time one host's work on one device)."""
    device = init_process_group("gpu" if device_kind == "cuda" else "cpu", 600)
    return initialize_parallel(1, 1, device, 600)


def layer_model(shape: str, groups: ParallelGroups, precision: str = "bf16", seed: int = 0, layers: int = 1,
                vocab: int = 32000, transformer_impl: str = "local") -> StarLlama:
    """``layers`` decoder layers (default one: per-layer figures scale with the layer count) of ``shape``
    with random weights (mcore's local layers or TransformerEngine's); under TP each rank draws its own
    shards from ``seed``."""
    s = SHAPES[shape]
    arch = LlamaArch(vocab_size=vocab, hidden_size=s["hidden_size"], intermediate_size=s["intermediate_size"],
                     num_layers=layers, num_heads=s["num_heads"], num_kv_heads=s["num_kv_heads"],
                     head_dim=s["head_dim"], rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=1 << 21)
    model = StarLlama(arch, groups, precision, transformer_impl)
    g = torch.Generator(device=groups.device).manual_seed(seed)
    with torch.no_grad():
        for name, p in model.gpt.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5, generator=g)
    return model


def timed(fn: Callable[[], object], device: torch.device, warmup: int = 1, reps: int = 3) -> float:
    """Median seconds of ``fn`` (device events on CUDA)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(reps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
    return statistics.median(times)


def hardware() -> dict:
    info = {"torch": torch.__version__, "python": platform.python_version(), "host": platform.node()}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, sms=props.multi_processor_count, memory_gib=round(props.total_memory / 2**30, 1))
    return info


def write_json(path: str | Path, payload: dict, announce: bool = True) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(payload, indent=1))
    if announce:
        print(f"wrote {path}", flush=True)


def device_kind(arg: str) -> str:
    return "cuda" if arg == "auto" and torch.cuda.is_available() else ("cpu" if arg == "auto" else arg)


def env_flags() -> None:
    # Keep NVLink multicast off (shared machines), as the device notes ask.
    os.environ.setdefault("NCCL_NVLS_ENABLE", "0")
    os.environ.setdefault("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1")


def random_phase1(engine) -> None:
    """For benchmarks of phase 2: the engine's phase 1 writes random K, V into the context's sequence instead of
    running the model (what phase 1 leaves, without its time). The decode steps read them as they would real KV."""
    m, g = engine.model, engine.groups
    hk = m.arch.num_kv_heads // g.tp.size()

    def prefill(context_ids: torch.Tensor, seq) -> None:
        m.runtime.reset_guard(g.device)  # as Engine.prefill: the guard encode reads
        gen = torch.Generator(device=g.device).manual_seed(0)
        n_all = engine.context_share(len(context_ids))
        for layer in range(m.arch.num_layers):
            for start in range(0, n_all, 16384):  # in pieces: no full-size temporary
                n = min(16384, n_all - start)
                k = torch.randn(1, hk, n, m.arch.head_dim, device=g.device, generator=gen, dtype=m.dtype)
                seq.append(layer, k, torch.randn_like(k))

    engine.prefill = prefill
