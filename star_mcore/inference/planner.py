"""Memory planner: per-GPU bytes of weights, KV cache and the largest phase-1 forward, from config.json and
the run's settings, so a run that cannot fit is refused before any weight is loaded."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Dict, Hashable, List, Optional, Sequence, Tuple

from ..config import RunConfig
from ..errors import RunError
from ..model.arch import LlamaArch, padded_vocab_size
from .modes import context_parallel_mode

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
GiB = 2 ** 30
GPU_FIXED = 2 * GiB  # measured on H100: 0.6 GiB CUDA context + ~0.4 GiB per NCCL communicator in use


@dataclass(frozen=True)
class Plan:
    weights: int  # bytes per GPU
    kv_cache: int  # the fullest host's cache (the query host also holds the query and the generated tokens)
    activations: int  # the largest phase-1 forward (one block with its anchor, a ring host's tokens, ...)
    segment_tokens: int  # tokens of that forward
    overhead: int = 0  # GPU: the CUDA context, NCCL's buffers and the caching allocator's slack

    @property
    def total(self) -> int:
        return self.weights + self.kv_cache + self.activations + self.overhead

    def table(self, capacity: int) -> str:
        rows = [("weights", self.weights), ("KV cache (fullest host)", self.kv_cache),
                (f"phase-1 activations ({self.segment_tokens} tokens)", self.activations),
                ("CUDA context, NCCL, allocator slack", self.overhead), ("total", self.total),
                ("device memory", capacity)]
        return "\n".join(f"{name:40} {b / GiB:10.3f} GiB" for name, b in rows)


def weight_bytes(arch: LlamaArch, tp: int, precision: str) -> int:
    h, hd = arch.hidden_size, arch.head_dim
    per_layer = (h * (arch.num_heads + 2 * arch.num_kv_heads) * hd + arch.num_heads * hd * h
                 + 3 * h * arch.intermediate_size) // tp + 2 * h
    heads = 1 if arch.tie_word_embeddings else 2  # tied: the output layer uses the embedding's tensor
    vocab = padded_vocab_size(arch.vocab_size, tp) // tp * h * heads  # embedding + output layer shards
    return (arch.num_layers * per_layer + vocab + h) * DTYPE_BYTES[precision]


def kv_bytes_per_token(arch: LlamaArch, tp: int, precision: str) -> int:
    return arch.num_layers * 2 * (arch.num_kv_heads // tp) * arch.head_dim * DTYPE_BYTES[precision]


def plan(cfg: RunConfig, arch: LlamaArch, context_len: int, query_len: int,
         tokens_to_generate: Optional[int] = None) -> Plan:
    """One request alone (``tokens_to_generate``: its budget, default the config's)."""
    tp, cp = cfg.model.tensor_model_parallel_size, cfg.model.context_parallel_size
    inf, prec = cfg.inference, cfg.model.precision
    new_tokens = query_len + (inf.tokens_to_generate if tokens_to_generate is None else tokens_to_generate)
    mode = context_parallel_mode(inf)
    held = mode.context_shares(context_len, cp)
    held[-1] += new_tokens
    phase1 = mode.footprint(context_len, cp)
    per_token_kv = kv_bytes_per_token(arch, tp, prec)
    kv = max(held) * per_token_kv
    b = DTYPE_BYTES[prec]
    h, i = arch.hidden_size, arch.intermediate_size // tp
    qkv = (arch.num_heads + 2 * arch.num_kv_heads) // tp * arch.head_dim
    # Hidden-state copies (embedding output, layer input, residual, norm) + SwiGLU's fc1 output (2i), its silu
    # and product + q, k, v before and after RoPE; fitted to measured peaks (docs/performance.md, +-5%).
    act_per_token = (4 * h + 4 * i + 2 * qkv) * b
    activations = (phase1.forward_tokens * act_per_token + phase1.anchor_kv_tokens * per_token_kv
                   + phase1.layer_kv_tokens * per_token_kv // arch.num_layers)
    # GPU: CUDA context + NCCL communicators, and the allocator's slack, which grows with the forward's size
    overhead = GPU_FIXED + activations // 3 if cfg.trainer.accelerator == "gpu" else 0
    return Plan(weight_bytes(arch, tp, prec), kv, activations, phase1.forward_tokens, overhead)


def device_capacity(cfg: RunConfig) -> int:
    """Bytes one rank may use: ``trainer.device_memory_gib`` if set, else the GPU's memory, or on CPU the
    machine's memory shared by the ranks of this node."""
    if cfg.trainer.device_memory_gib > 0:
        return int(cfg.trainer.device_memory_gib * GiB)
    if cfg.trainer.accelerator == "gpu":
        import torch

        if not torch.cuda.is_available():
            return 80 * GiB  # planning away from the GPUs: assume an 80 GB card (set trainer.device_memory_gib)
        return torch.cuda.get_device_properties(int(os.environ.get("LOCAL_RANK", "0"))).total_memory
    ranks_here = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // ranks_here


def check_fits(cfg: RunConfig, arch: LlamaArch, context_len: int, query_len: int,
               tokens_to_generate: Optional[int] = None) -> Plan:
    """Refuse (one line) a run whose estimate exceeds the device's memory."""
    p = plan(cfg, arch, context_len, query_len, tokens_to_generate)
    cap = device_capacity(cfg)
    if p.total > cap:
        raise RunError(f"the run does not fit: about {p.total / GiB:.2f} GiB per GPU (weights {p.weights / GiB:.2f}, "
                       f"KV cache {p.kv_cache / GiB:.2f}, phase-1 activations {p.activations / GiB:.2f}) for "
                       f"{context_len} context tokens, > {cap / GiB:.2f} GiB of device memory; add hosts or TP, "
                       "use smaller blocks or anchor, or shorter requests (star-mcore plan shows the estimate)")
    return p


def context_pages(mode, cp: int, page: int, context_len: int) -> List[int]:
    """Pages of ``page`` tokens that each host's share of a ``context_len``-token context takes."""
    return [-(-n // page) for n in mode.context_shares(context_len, cp)]


def pages_wanted(mode, cp: int, page: int, slots: int,
                 requests: Sequence[Tuple[Hashable, int, int]]) -> Tuple[int, int]:
    """(pages for any ``slots`` of ``requests`` at once, pages of the largest alone) on the fullest host, scratch
    not counted. requests: (context key, context tokens, own tokens: query + budget); requests with one key share
    one copy of the context, and the own tokens live on the last host. The first is a bound: the ``slots``
    largest contexts plus the ``slots`` largest own parts."""
    contexts: Dict[Hashable, List[int]] = {}
    owns: List[int] = []
    alone = 0
    for key, ctx, own in requests:
        shares = context_pages(mode, cp, page, ctx)
        contexts[key] = shares
        owns.append(-(-own // page))
        alone = max(alone, max(shares[:-1], default=0), shares[-1] + owns[-1])
    top = lambda xs: sum(sorted(xs, reverse=True)[:slots])  # noqa: E731
    own_top = top(owns)
    wanted = max(top([c[h] for c in contexts.values()]) + (own_top if h == cp - 1 else 0) for h in range(cp))
    return wanted, alone


def pool_pages(mode, cp: int, page: int, slots: int, requests: Sequence[Tuple[Hashable, int, int]],
               budget: Optional[int] = None) -> int:
    """Pages of each host's KV pool for ``requests`` (as :func:`pages_wanted` takes them): what any ``slots`` of
    them need at once, capped by ``budget`` pages where given but never below what the largest needs alone, and
    the scratch page."""
    wanted, largest = pages_wanted(mode, cp, page, slots, requests)
    return 1 + (wanted if budget is None else max(largest, min(wanted, budget)))


def kv_pool_pages(cfg: RunConfig, arch: LlamaArch, requests: Sequence[Tuple[Hashable, int, int]]) -> int:
    """Pages of each host's KV pool for a run over ``requests`` ((context key, tokens, own tokens)): what
    ``inference.max_batch_size`` of them need at once on the fullest host (the largest needs, so any mix fits),
    capped by the memory the planner leaves beside the weights and the largest request's phase-1 forward, never
    below what the largest one needs alone. Admission then keeps every host within it."""
    inf = cfg.inference
    _, ctx, own = max(requests, key=lambda r: r[1] + r[2])
    p = plan(cfg, arch, ctx, 0, own)
    per_page = inf.kv_page_size * kv_bytes_per_token(arch, cfg.model.tensor_model_parallel_size, cfg.model.precision)
    budget = (device_capacity(cfg) - p.weights - p.activations - p.overhead) // per_page
    return pool_pages(context_parallel_mode(inf), cfg.model.context_parallel_size, inf.kv_page_size,
                      inf.max_batch_size, requests, budget)


def serve_pool_pages(cfg: RunConfig, arch: LlamaArch) -> int:
    """Pages of each host's KV pool for ``serve``, where the requests are not known in advance:
    ``serve.kv_pool_tokens`` if set, else what ``inference.max_batch_size`` requests of the model's full length
    need at once, capped by memory as :func:`kv_pool_pages` caps a run's."""
    inf, n = cfg.inference, arch.max_position_embeddings
    if cfg.serve.kv_pool_tokens:
        return 1 + -(-cfg.serve.kv_pool_tokens // inf.kv_page_size)
    return kv_pool_pages(cfg, arch, [(i, n - inf.tokens_to_generate - 1, inf.tokens_to_generate + 1)
                                     for i in range(inf.max_batch_size)])
