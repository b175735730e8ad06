"""The run configuration: one typed schema, loaded by omegaconf from YAML plus ``key=value`` overrides,
validated once, up front (before any process group or weight exists)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import ConfigError

MODES = ("star", "ring", "none")
PRECISIONS = ("fp32", "bf16", "fp16")
TRANSFORMER_IMPLS = ("local", "transformer_engine")
ACCELERATORS = ("cpu", "gpu")
ANCHOR_MODES = ("shared", "recompute")
PARTITIONS = ("uniform", "balanced")
STAR_CONTEXTS = ("anchor", "long_anchor", "anchor+previous", "anchor+landmarks")
DECODE_LOOPS = ("graph", "static", "eager")
ATTENTION_BACKENDS = ("auto", "math", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "flash_attn2", "flash_attn3",
                      "flash_attn4", "te")


@dataclass
class CheckpointConfig:
    """Exactly one of ``hf_path`` and ``megatron_path``."""

    hf_path: str = ""  # HF Llama directory: config.json + *.safetensors (+ tokenizer for text requests)
    megatron_path: str = ""  # torch_dist checkpoint: an iter_XXXXXXX directory, or the save directory above it
    iteration: int = -1  # megatron_path is a save directory: which iter_XXXXXXX; -1 = the latest (its tracker file)
    hf_config: str = ""  # megatron_path: a config.json giving the architecture, where the checkpoint has none
    tokenizer_path: str = ""  # megatron_path: tokenizer directory (default: the checkpoint's tokenizer/, if any)


@dataclass
class ModelConfig:
    tensor_model_parallel_size: int = 1
    context_parallel_size: int = 1  # number of star hosts
    precision: str = "bf16"  # fp32 | bf16 | fp16
    # megatron-core's layer: local (torch RMSNorm, mcore linears) | transformer_engine (TE's fused RMSNorm + linear)
    transformer_impl: str = "local"


@dataclass
class TrainerConfig:
    accelerator: str = "gpu"  # gpu (NCCL) | cpu (gloo)
    device_memory_gib: float = 0.0  # memory one rank may use; 0 = the GPU's (or, on CPU, RAM / ranks per node)


@dataclass
class SamplingConfig:
    """Defaults of every request's sampling fields (a request's own fields override them)."""

    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = no limit
    top_p: float = 1.0  # nucleus sampling: the smallest set of tokens whose probability reaches top_p
    seed: int = 0  # a request without its own seed draws from a seed derived from this one and its id
    stop: List[str] = field(default_factory=list)  # text requests: the answer ends before the first of these
    stop_token_ids: List[int] = field(default_factory=list)  # the answer ends at (and includes) any of these
    logprobs: int = 0  # the top N log-probs of each generated token (0: none), N <= 20


@dataclass
class InferenceConfig:
    context_parallel_mode: str = "star"  # star | ring | none
    block_size: int = 4096  # star: context tokens per block
    anchor_size: int = 4096  # star: tokens of c[0:anchor_size] prepended to blocks k >= 1; 0 = no anchor
    anchor_mode: str = "shared"  # star: shared (block 0's host sends the anchor KV) | recompute (paper: re-encode)
    partition: str = "uniform"  # star: uniform (blocks of block_size) | balanced (block 0 = block + anchor tokens)
    # star: what block k >= 1 sees in phase 1 besides itself: anchor (c[0:a]) | long_anchor (c[0:min(a, start)],
    # a may exceed block_size) | anchor+previous (and the previous block's phase-1 KV: one p2p hop per layer)
    # | anchor+landmarks (and `landmarks` evenly spaced chunks of `landmark_size` tokens of c[a:start])
    star_context: str = "anchor"
    landmarks: int = 4  # star_context=anchor+landmarks: chunks per block
    landmark_size: int = 64  # star_context=anchor+landmarks: tokens per chunk
    tokens_to_generate: int = 32
    input_path: str = ""  # generate: JSONL of {"id", "context_ids", "query_ids"} or {"id", "context", "query"}
    output_path: str = ""  # generate: JSONL, one line per request, in input order
    save_logits: bool = False  # add the first generated token's full-vocabulary logits to each output
    apply_chat_template: bool = False  # text requests: wrap context + query in the tokenizer's chat template
    attention_backend: str = "auto"  # one of ATTENTION_BACKENDS; the last four need their library installed
    decode: str = "graph"  # graph (static step replayed from a CUDA graph) | static (same step, no graph) | eager
    max_batch_size: int = 8  # requests decoding together (continuous batching); 1 = one at a time
    kv_page_size: int = 256  # tokens per page of the KV pool
    sampling: SamplingConfig = field(default_factory=SamplingConfig)


@dataclass
class DistributedConfig:
    timeout_s: float = 600.0  # collectives that wait longer fail instead of hanging
    heartbeat_timeout_s: float = 30.0  # a rank silent this long counts as dead: every other rank exits, naming it


@dataclass
class EvalConfig:
    """``star-mcore eval ruler|babilong``: synthetic long-context tasks at given token lengths."""

    tasks: List[str] = field(default_factory=list)  # task names of the benchmark; empty = all of them
    lengths: List[int] = field(default_factory=lambda: [4096])  # prompt tokens (context + query) per sample
    samples: int = 20  # per task and length
    seed: int = 0  # same seed, tokenizer and length -> same samples
    output_path: str = ""  # results JSONL, appended per sample; a rerun skips the samples already in it
    squad_path: str = ""  # qa_1: local SQuAD json (e.g. dev-v2.0.json); empty = skip qa_1
    hotpotqa_path: str = ""  # qa_2: local HotpotQA json (e.g. hotpot_dev_distractor_v1.json); empty = skip qa_2
    tokens_to_generate: int = 0  # 0 = each task's own default


@dataclass
class ServeConfig:
    """``star-mcore serve``: the OpenAI-compatible HTTP server (global rank 0 listens; every rank runs the engine)."""

    host: str = "127.0.0.1"  # address to listen on (0.0.0.0: every interface)
    port: int = 8000
    model_name: str = ""  # the model's id in /v1/models and the requests' "model"; empty = the checkpoint's folder name
    max_resident_tokens: int = 0  # context tokens kept encoded between requests (LRU); 0 = as many as the KV pool holds
    drain_s: float = 20.0  # SIGTERM: requests still running this long after it are cancelled (torchrun kills at 30 s)
    kv_pool_tokens: int = 0  # tokens of each host's KV pool; 0 = the planner's: max_batch_size full-length requests,
    # capped by the memory beside the weights


@dataclass
class RunConfig:
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    inference: InferenceConfig = field(default_factory=InferenceConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)


def _one_line(e: OmegaConfBaseException) -> str:
    msg = str(e).strip().splitlines()
    head = msg[0] if msg else type(e).__name__
    key = getattr(e, "full_key", None)
    return f"{head} (key: {key})" if key and key not in head else head


def load_config(path: Optional[str], overrides: Sequence[str] = ()) -> RunConfig:
    """Schema <- YAML file <- ``key=value`` overrides; unknown keys and wrong types are refused."""
    try:
        merged = OmegaConf.structured(RunConfig)
        if path is not None:
            if not Path(path).is_file():
                raise ConfigError(f"config file not found: {path}")
            merged = OmegaConf.merge(merged, OmegaConf.load(path))
        bad = [o for o in overrides if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key=value, got {bad[0]!r}")
        merged = OmegaConf.merge(merged, OmegaConf.from_dotlist(list(overrides)))
        cfg: RunConfig = OmegaConf.to_object(merged)
    except OmegaConfBaseException as e:
        raise ConfigError(f"invalid config: {_one_line(e)}") from None
    validate(cfg)
    return cfg


def validate(cfg: RunConfig) -> None:
    m, inf = cfg.model, cfg.inference

    def need(ok: bool, msg: str) -> None:
        if not ok:
            raise ConfigError(msg)

    need(inf.context_parallel_mode in MODES,
         f"inference.context_parallel_mode must be one of {', '.join(MODES)}, got {inf.context_parallel_mode!r}")
    need(inf.anchor_mode in ANCHOR_MODES,
         f"inference.anchor_mode must be one of {', '.join(ANCHOR_MODES)}, got {inf.anchor_mode!r}")
    need(inf.partition in PARTITIONS,
         f"inference.partition must be one of {', '.join(PARTITIONS)}, got {inf.partition!r}")
    need(inf.star_context in STAR_CONTEXTS,
         f"inference.star_context must be one of {', '.join(STAR_CONTEXTS)}, got {inf.star_context!r}")
    need(inf.star_context != "anchor+previous" or inf.anchor_mode == "shared",
         "inference.star_context=anchor+previous needs inference.anchor_mode=shared")
    need(inf.landmarks >= 1, f"inference.landmarks must be >= 1, got {inf.landmarks}")
    need(inf.landmark_size >= 1, f"inference.landmark_size must be >= 1, got {inf.landmark_size}")
    ck = cfg.checkpoint
    need(bool(ck.hf_path) != bool(ck.megatron_path),
         "set exactly one of checkpoint.hf_path and checkpoint.megatron_path"
         + (f" (got both: {ck.hf_path!r}, {ck.megatron_path!r})" if ck.hf_path and ck.megatron_path else ""))
    for key in ("iteration", "hf_config", "tokenizer_path"):
        need(ck.megatron_path or getattr(ck, key) == getattr(CheckpointConfig, key),
             f"checkpoint.{key} applies to checkpoint.megatron_path only")
    need(ck.iteration >= -1, f"checkpoint.iteration must be >= 0, or -1 for the latest, got {ck.iteration}")
    need(m.precision in PRECISIONS, f"model.precision must be one of {', '.join(PRECISIONS)}, got {m.precision!r}")
    need(m.transformer_impl in TRANSFORMER_IMPLS,
         f"model.transformer_impl must be one of {', '.join(TRANSFORMER_IMPLS)}, got {m.transformer_impl!r}")
    need(cfg.trainer.accelerator in ACCELERATORS,
         f"trainer.accelerator must be one of {', '.join(ACCELERATORS)}, got {cfg.trainer.accelerator!r}")
    need(m.transformer_impl != "transformer_engine" or cfg.trainer.accelerator == "gpu",
         "model.transformer_impl=transformer_engine runs on GPUs only (TransformerEngine's layers): "
         "use model.transformer_impl=local with trainer.accelerator=cpu")
    need(inf.decode in DECODE_LOOPS, f"inference.decode must be one of {', '.join(DECODE_LOOPS)}, got {inf.decode!r}")
    need(inf.attention_backend in ATTENTION_BACKENDS,
         f"inference.attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {inf.attention_backend!r}")
    need(m.tensor_model_parallel_size >= 1, "model.tensor_model_parallel_size must be >= 1")
    need(m.context_parallel_size >= 1, "model.context_parallel_size must be >= 1")
    need(inf.block_size > 0, f"inference.block_size must be > 0, got {inf.block_size}")
    need(inf.anchor_size >= 0, f"inference.anchor_size must be >= 0, got {inf.anchor_size}")
    need(inf.anchor_size <= inf.block_size or inf.star_context == "long_anchor",
         f"inference.anchor_size ({inf.anchor_size}) must be <= inference.block_size ({inf.block_size}); "
         "a longer anchor is inference.star_context=long_anchor")
    need(inf.tokens_to_generate >= 1, f"inference.tokens_to_generate must be >= 1, got {inf.tokens_to_generate}")
    need(inf.max_batch_size >= 1, f"inference.max_batch_size must be >= 1, got {inf.max_batch_size}")
    need(inf.kv_page_size >= 1, f"inference.kv_page_size must be >= 1, got {inf.kv_page_size}")
    sp = inf.sampling
    for key, problem in sampling_problems(sp.temperature, sp.top_k, sp.top_p, sp.seed, sp.logprobs).items():
        raise ConfigError(f"inference.sampling.{key} {problem}")
    need(inf.context_parallel_mode != "none" or m.context_parallel_size == 1,
         "inference.context_parallel_mode=none runs without context parallelism: "
         f"set model.context_parallel_size=1 (got {m.context_parallel_size})")
    need(cfg.trainer.device_memory_gib >= 0, "trainer.device_memory_gib must be >= 0")
    need(cfg.distributed.timeout_s > 0, "distributed.timeout_s must be > 0")
    need(cfg.distributed.heartbeat_timeout_s > 0, "distributed.heartbeat_timeout_s must be > 0")
    sv = cfg.serve
    need(0 <= sv.port < 65536, f"serve.port must be in [0, 65535], got {sv.port}")
    need(bool(sv.host), "serve.host must not be empty")
    need(sv.max_resident_tokens >= 0, f"serve.max_resident_tokens must be >= 0, got {sv.max_resident_tokens}")
    need(sv.drain_s >= 0, f"serve.drain_s must be >= 0, got {sv.drain_s}")
    need(sv.kv_pool_tokens >= 0, f"serve.kv_pool_tokens must be >= 0, got {sv.kv_pool_tokens}")
    ev = cfg.eval
    need(len(ev.lengths) > 0 and all(n > 0 for n in ev.lengths), f"eval.lengths must be positive, got {ev.lengths}")
    need(ev.samples >= 1, f"eval.samples must be >= 1, got {ev.samples}")
    need(ev.tokens_to_generate >= 0, f"eval.tokens_to_generate must be >= 0, got {ev.tokens_to_generate}")


MAX_LOGPROBS = 20  # as OpenAI's top_logprobs (ops.sampling.TOP_LOGPROBS)


def sampling_problems(temperature, top_k, top_p, seed, logprobs) -> dict:
    """What is wrong with sampling values, by field name (empty: nothing). The config's defaults and every
    request's own fields are checked by this one function."""
    out = {}
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature >= 0:
        out["temperature"] = f"must be a number >= 0, got {temperature!r}"
    if not isinstance(top_k, int) or isinstance(top_k, bool) or top_k < 0:
        out["top_k"] = f"must be an integer >= 0 (0: no limit), got {top_k!r}"
    if not isinstance(top_p, (int, float)) or isinstance(top_p, bool) or not 0 < top_p <= 1:
        out["top_p"] = f"must be in (0, 1], got {top_p!r}"
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2 ** 63:
        out["seed"] = f"must be an integer in [0, 2**63), got {seed!r}"
    if not isinstance(logprobs, int) or isinstance(logprobs, bool) or not 0 <= logprobs <= MAX_LOGPROBS:
        out["logprobs"] = f"must be an integer in [0, {MAX_LOGPROBS}], got {logprobs!r}"
    return out


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def world_size_needed(cfg: RunConfig) -> int:
    return cfg.model.tensor_model_parallel_size * cfg.model.context_parallel_size

