"""Host memory of the checkpoint load: each rank of a real gloo world (CPU) builds a bf16 StarLlama and fills it
with its checkpoint's loader (``load_hf_llama``; with ``--megatron`` also ``load_megatron_llama``); a thread
samples /proc/self/status (RssAnon, RssFile, VmRSS) every few ms while it loads. Reported per rank next to the
bytes of that rank's weights and of the whole checkpoint.

Checkpoints (generated under --workdir, never in the repository):
- ``tiny``: make_tiny_llama's defaults (fp32, one model.safetensors, no index) -- the fp32 -> bf16 path;
- ``mid``: a random ~1.1B-parameter Llama in bf16 (hidden 2048, 16 layers, 32 / 8 KV heads, intermediate 8192,
  vocab 32000), several shard files + model.safetensors.index.json, written tensor by tensor by a streaming
  safetensors writer (the generator holds one tensor at a time);
- ``mid-megatron`` (``--megatron``): ``mid`` saved at TP 2 by megatron-core's ``dist_checkpointing.save``
  (scripts/make_megatron_checkpoints.py's ``save_rank``; no saved args, so loaded with ``checkpoint.hf_config``),
  loaded at every world's TP: the resharding path.

Worlds: TP=1, TP=2, TP=1 x CP=2 (CP ranks hold full TP shards). ``--naive`` adds, at TP=2, the same loader with
its reader swapped for one that first loads every shard whole (``load_file``: mmapped whole tensors; and
``read_bytes``: each file read into memory), for contrast.

    python scripts/bench_load.py --out docs/bench/load_memory.json --workdir /tmp/star-load --naive --megatron
    python scripts/plot_bench.py docs/bench
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import resource
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT / "tests"))
import benchlib  # noqa: E402
from distributed import run_world  # noqa: E402  (the tests' spawner: one process per rank, gloo)

MID = dict(vocab_size=32000, hidden_size=2048, intermediate_size=8192, num_layers=16, num_heads=32, num_kv_heads=8)
ST_DTYPE = {torch.bfloat16: "BF16", torch.float16: "F16", torch.float32: "F32"}
WEIGHT_GLOBS = ("*.safetensors", "*.distcp")
MIB = 2**20


# ---------------------------------------------------------------- checkpoint generation (streaming)

def write_safetensors(path: Path, entries: List[Tuple[str, Tuple[int, ...], torch.dtype, Callable[[], torch.Tensor]]],
                      metadata: Optional[Dict[str, str]] = None) -> int:
    """Write a safetensors file whose tensors are made one at a time by ``entries``' callables: the header is
    computed from shapes first, then each tensor is generated, written and dropped. Returns the data bytes."""
    header, off = {}, 0
    for name, shape, dtype, _ in entries:
        n = dtype.itemsize
        for s in shape:
            n *= s
        header[name] = {"dtype": ST_DTYPE[dtype], "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    if metadata:
        header["__metadata__"] = metadata
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the data section starts 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, dtype, make in entries:
            t = make().to(dtype).contiguous()
            assert tuple(t.shape) == tuple(shape), name
            f.write(t.view(torch.uint8).numpy())
            del t
    return off


def make_mid_llama(path: Path, *, vocab_size: int, hidden_size: int, intermediate_size: int, num_layers: int,
                   num_heads: int, num_kv_heads: int, dtype: torch.dtype = torch.bfloat16,
                   max_shard_bytes: int = 512 * MIB, seed: int = 0) -> Path:
    """A random Llama in HF layout: config.json, model-0000k-of-0000n.safetensors, model.safetensors.index.json."""
    path.mkdir(parents=True, exist_ok=True)
    hd = hidden_size // num_heads
    shapes: List[Tuple[str, Tuple[int, ...]]] = [("model.embed_tokens.weight", (vocab_size, hidden_size))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (hidden_size,)),
                   (p + "self_attn.q_proj.weight", (num_heads * hd, hidden_size)),
                   (p + "self_attn.k_proj.weight", (num_kv_heads * hd, hidden_size)),
                   (p + "self_attn.v_proj.weight", (num_kv_heads * hd, hidden_size)),
                   (p + "self_attn.o_proj.weight", (hidden_size, num_heads * hd)),
                   (p + "post_attention_layernorm.weight", (hidden_size,)),
                   (p + "mlp.gate_proj.weight", (intermediate_size, hidden_size)),
                   (p + "mlp.up_proj.weight", (intermediate_size, hidden_size)),
                   (p + "mlp.down_proj.weight", (hidden_size, intermediate_size))]
    shapes += [("model.norm.weight", (hidden_size,)), ("lm_head.weight", (vocab_size, hidden_size))]

    def maker(k: int, shape: Tuple[int, ...]) -> Callable[[], torch.Tensor]:
        def make() -> torch.Tensor:
            g = torch.Generator().manual_seed(seed * 100003 + k)
            if len(shape) == 1:
                return 1.0 + 0.1 * torch.randn(shape, generator=g)
            return torch.randn(shape, generator=g) / shape[1] ** 0.5
        return make

    shards: List[List[int]] = [[]]
    size = 0
    for k, (_, shape) in enumerate(shapes):
        n = dtype.itemsize * torch.Size(shape).numel()
        if shards[-1] and size + n > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(k)
        size += n
    weight_map, total = {}, 0
    for j, ks in enumerate(shards):
        fn = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        total += write_safetensors(path / fn, [(shapes[k][0], shapes[k][1], dtype, maker(k, shapes[k][1])) for k in ks],
                                   metadata={"format": "pt"})
        weight_map.update({shapes[k][0]: fn for k in ks})
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    (path / "config.json").write_text(json.dumps({
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": vocab_size,
        "hidden_size": hidden_size, "intermediate_size": intermediate_size, "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads, "num_key_value_heads": num_kv_heads, "head_dim": hd,
        "hidden_act": "silu", "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 8192,
        "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False,
        "torch_dtype": str(dtype).replace("torch.", "")}, indent=2))
    return path


def checkpoint_info(path: Path) -> dict:
    """Files, bytes and tensor shapes / dtypes, read from the safetensors headers only."""
    from safetensors import safe_open

    files = sorted(path.glob("*.safetensors"))
    tensors, dtypes = {}, set()
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for k in h.keys():
                sl = h.get_slice(k)
                tensors[k] = sl.get_shape()
                dtypes.add(sl.get_dtype())
    return {"path": str(path), "files": [f.name for f in files], "file_bytes": sum(f.stat().st_size for f in files),
            "index": (path / "model.safetensors.index.json").exists(), "dtypes": sorted(dtypes),
            "params": sum(torch.Size(s).numel() for s in tensors.values()), "tensors": len(tensors),
            "config": json.loads((path / "config.json").read_text())}


def weight_files(path: Path) -> List[Path]:
    return sorted(f for g in WEIGHT_GLOBS for f in path.glob(g))


def drop_page_cache(path: Path) -> None:
    """Evict the checkpoint's (clean, unmapped) pages from the page cache: every load starts cold."""
    for f in weight_files(path):
        fd = os.open(f, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def page_cache_bytes(path: Path) -> Optional[int]:
    """Bytes of the checkpoint's files in the page cache (util-linux fincore), None without it."""
    try:
        out = subprocess.run(["fincore", "--bytes", "--noheadings", "--output", "RES",
                              *map(str, weight_files(path))],
                             capture_output=True, text=True, check=True)
        return sum(int(x) for x in out.stdout.split())
    except (OSError, subprocess.CalledProcessError, ValueError):
        return None


# ---------------------------------------------------------------- per-rank measurement

def proc_status() -> Dict[str, int]:
    """VmRSS, RssAnon, RssFile, RssShmem, VmHWM of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, val = line.partition(":")
            if key in ("VmRSS", "RssAnon", "RssFile", "RssShmem", "VmHWM"):
                out[key] = int(val.split()[0]) * 1024
    return out


class Sampler(threading.Thread):
    """Maxima of /proc/self/status's RSS fields, sampled every ``period_s`` until stopped."""

    def __init__(self, period_s: float) -> None:
        super().__init__(daemon=True)
        self.period_s, self.samples = period_s, 0
        self.peak: Dict[str, int] = {}
        self._stop_ev = threading.Event()

    def run(self) -> None:
        while not self._stop_ev.is_set():
            for k, v in proc_status().items():
                self.peak[k] = max(self.peak.get(k, 0), v)
            self.samples += 1
            time.sleep(self.period_s)

    def stop(self) -> Dict[str, int]:
        self._stop_ev.set()
        self.join()
        for k, v in proc_status().items():  # one last sample after the load
            self.peak[k] = max(self.peak.get(k, 0), v)
        return self.peak


class NaiveReader:
    """The loader's reader interface over every shard loaded whole up front (for contrast):
    ``load_file``: safetensors.torch.load_file (mmapped whole tensors); ``read_bytes``: each file read into memory."""

    def __init__(self, path, how: str) -> None:
        from safetensors.torch import load, load_file

        self.tensors: Dict[str, torch.Tensor] = {}
        for f in sorted(Path(path).glob("*.safetensors")):
            self.tensors.update(load_file(str(f)) if how == "load_file" else load(f.read_bytes()))

    def __contains__(self, name: str) -> bool:
        return name in self.tensors

    def read(self, name, rows=None, cols=None):
        t = self.tensors[name]
        r = slice(*rows) if rows else slice(None)
        c = slice(*cols) if cols else slice(None)
        return t[r, c] if t.dim() == 2 else t[r]


def load_worker(ckpt: dict, tp: int, cp: int, method: str, period_s: float) -> dict:
    """One rank: open ``ckpt`` (CheckpointConfig fields) and build the bf16 model as inference.runner does, then
    measure the checkpoint's load."""
    sys.setswitchinterval(period_s / 2)  # let the sampler thread in often while the loader runs Python
    from star_mcore.config import CheckpointConfig
    from star_mcore.model import hf_checkpoint, megatron_checkpoint
    from star_mcore.model.checkpoint import open_checkpoint
    from star_mcore.model.llama import StarLlama
    from star_mcore.parallel.groups import destroy_parallel, init_process_group, initialize_parallel

    device = init_process_group("cpu", 600)
    groups = initialize_parallel(tp, cp, device, 600)
    try:
        gc.collect()
        before_model = proc_status()
        opened = open_checkpoint(CheckpointConfig(**ckpt))
        model = StarLlama(opened.arch, groups, "bf16")  # parameters allocated, not yet touched
        params = list(model.gpt.parameters())
        weight_bytes = sum(p.numel() * p.element_size() for p in params)
        reads = {"calls": 0, "bytes": 0, "largest": 0}
        base_reader = hf_checkpoint.SafetensorsReader if method == "star_mcore" else (
            lambda path: NaiveReader(path, method.removeprefix("naive_")))

        class CountingReader:  # the loader's reader, counting the bytes of every slice it asks for
            def __init__(self, path):
                self._r = base_reader(path)

            def __contains__(self, name):
                return name in self._r

            def read(self, name, rows=None, cols=None):
                t = self._r.read(name, rows=rows, cols=cols)
                count(t.numel() * t.element_size())
                return t

        def count(n: int) -> None:
            reads["calls"] += 1
            reads["bytes"] += n
            reads["largest"] = max(reads["largest"], n)

        dcp_read = megatron_checkpoint.DcpCheckpoint.read

        def counting_dcp_read(self, boxes, wants):  # the Megatron loader's one request: every box of this rank
            for _, _, dest in wants:
                count(dest.numel() * dest.element_size())
            return dcp_read(self, boxes, wants)

        hf_checkpoint.SafetensorsReader = CountingReader
        megatron_checkpoint.DcpCheckpoint.read = counting_dcp_read
        torch.distributed.barrier()
        gc.collect()
        baseline = proc_status()
        with open("/proc/self/clear_refs", "w") as f:  # VmHWM := VmRSS now: VmHWM after = the load's exact peak RSS
            f.write("5")
        sampler = Sampler(period_s)
        sampler.start()
        t0 = time.perf_counter()
        opened.load(model, groups.tp_rank, tp)
        load_s = time.perf_counter() - t0
        gc.collect()
        peak = sampler.stop()
        final = proc_status()
        torch.distributed.barrier()
        dtypes = sorted({str(p.dtype) for p in params})
        assert dtypes == ["torch.bfloat16"], f"loaded parameters are {dtypes}, not bf16 only"
        return {"rank": torch.distributed.get_rank(), "tp_rank": groups.tp_rank, "cp_rank": groups.cp_rank,
                "param_dtypes": dtypes, "rank_weight_bytes": weight_bytes, "requested": reads,
                "before_model": before_model, "baseline": baseline, "peak_sampled": peak, "final": final,
                "vmhwm_load": peak["VmHWM"],
                "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                "samples": sampler.samples, "load_s": round(load_s, 3)}
    finally:
        destroy_parallel()


def measure(name: str, path: Path, info: dict, tp: int, cp: int, method: str, period_s: float,
            ckpt: Optional[dict] = None) -> List[dict]:
    """``ckpt``: the CheckpointConfig fields (default: ``hf_path=path``); ``path``: where its weight files are."""
    drop_page_cache(path)
    cached_before = page_cache_bytes(path)
    ranks = run_world(tp * cp, load_worker, ckpt or {"hf_path": str(path)}, tp, cp, method, period_s, timeout=1800)
    cached_after = page_cache_bytes(path)
    rows = []
    for r in ranks:
        over = {k: r["peak_sampled"][k] - r["baseline"][k] for k in ("RssAnon", "RssFile", "VmRSS")}
        rows.append({"checkpoint": name, "tp": tp, "cp": cp, "method": method, "checkpoint_bytes": info["file_bytes"],
                     "page_cache_before": cached_before, "page_cache_after": cached_after,
                     "peak_over_baseline": over, **r})
        print(f"{name:5} tp={tp} cp={cp} rank {r['rank']} {method:20} "
              f"weights {r['rank_weight_bytes'] / MIB:8.1f} MiB | "
              f"peak over baseline: anon {over['RssAnon'] / MIB:8.1f}  file {over['RssFile'] / MIB:8.1f} MiB | "
              f"VmHWM {r['vmhwm_load'] / MIB:8.1f}  ru_maxrss {r['ru_maxrss'] / MIB:8.1f} MiB | "
              f"final anon {(r['final']['RssAnon'] - r['baseline']['RssAnon']) / MIB:8.1f} "
              f"file {(r['final']['RssFile'] - r['baseline']['RssFile']) / MIB:6.1f} MiB | {r['load_s']:.2f}s "
              f"({r['samples']} samples)", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", required=True)
    ap.add_argument("--workdir", default="/tmp/star-load-bench", help="where the checkpoints are generated")
    ap.add_argument("--checkpoints", default="tiny,mid")
    ap.add_argument("--worlds", default="1x1,2x1,1x2", help="TPxCP worlds")
    ap.add_argument("--naive", action="store_true", help="also the load-every-shard-whole contrast, at TP=2")
    ap.add_argument("--period-ms", type=float, default=2.0)
    ap.add_argument("--smoke", action="store_true", help="a small 'mid' (2 layers, hidden 256): checks the script")
    ap.add_argument("--megatron", action="store_true", help="also 'mid' saved as a Megatron torch_dist checkpoint")
    args = ap.parse_args()
    work = Path(args.workdir)
    mid = dict(MID, hidden_size=256, intermediate_size=512, num_layers=2, num_heads=8, num_kv_heads=4,
               vocab_size=1000) if args.smoke else MID
    results = {"hardware": {**benchlib.hardware(), "machine": platform.machine(), "cpus": os.cpu_count(),
                            "mem_total_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                            "kernel": platform.release()},
               "versions": {}, "period_ms": args.period_ms, "checkpoints": {}, "rows": []}
    import megatron.core
    import safetensors

    results["versions"] = {"torch": torch.__version__, "megatron_core": megatron.core.__version__,
                           "safetensors": safetensors.__version__}
    for name in args.checkpoints.split(","):
        path = work / ("mid-smoke" if name == "mid" and args.smoke else name)
        if not (path / "config.json").exists():
            t = time.perf_counter()
            if name == "tiny":
                from star_mcore.model.tiny import make_tiny_llama
                make_tiny_llama(path)
            else:
                make_mid_llama(path, **mid)
            print(f"generated {path} in {time.perf_counter() - t:.1f}s", flush=True)
        info = results["checkpoints"][name] = checkpoint_info(path)
        print(f"{name}: {info['params'] / 1e6:.1f}M params, {info['file_bytes'] / MIB:.1f} MiB in {len(info['files'])} "
              f"file(s), {info['dtypes']}", flush=True)
        for world in args.worlds.split(","):
            tp, cp = map(int, world.split("x"))
            results["rows"] += measure(name, path, info, tp, cp, "star_mcore", args.period_ms / 1e3)
        if args.naive:
            for method in ("naive_load_file", "naive_read_bytes"):
                results["rows"] += measure(name, path, info, 2, 1, method, args.period_ms / 1e3)
        if args.megatron and name == "mid":
            save = path.with_name(path.name + "-megatron")
            it_dir = save / "iter_0000001"
            if not (it_dir / "metadata.json").exists():
                import make_megatron_checkpoints

                t = time.perf_counter()
                it_dir.mkdir(parents=True)
                run_world(2, make_megatron_checkpoints.save_rank, str(path), str(it_dir), 2,
                          {"checkpoint_version": 3.0, "iteration": 1}, timeout=3600)
                (save / "latest_checkpointed_iteration.txt").write_text("1")
                print(f"saved {save} (TP 2) in {time.perf_counter() - t:.1f}s", flush=True)
            files = weight_files(it_dir)
            results["checkpoints"][save.name] = {"path": str(save), "files": [f.name for f in files],
                                                 "file_bytes": sum(f.stat().st_size for f in files),
                                                 "saved_tp": 2, "params": info["params"]}
            for world in args.worlds.split(","):
                tp, cp = map(int, world.split("x"))
                results["rows"] += measure(save.name, it_dir, results["checkpoints"][save.name], tp, cp, "megatron",
                                           args.period_ms / 1e3, {"megatron_path": str(save),
                                                                  "hf_config": str(path / "config.json")})
    benchlib.write_json(args.out, results)


if __name__ == "__main__":
    main()
