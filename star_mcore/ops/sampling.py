"""Choosing each slot's next token from its logits: greedy, or sampled with temperature, top-k and top-p, and the
log-probs a request asked for. Pure tensor math on the device, no host reads (a decode step can be captured).

Randomness is counter-based: the noise of slot s is a hash of (its request's seed, the index of the token being
chosen, the vocabulary id), never a shared generator's state. So a seeded request gets the same tokens alone or
in any batch, in any slot, on any run. Sampling is Gumbel-max: argmax(logits / T + G) with G = -log(-log(U))
over the tokens top-k and top-p keep, which draws exactly from the softmax of the kept logits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterable, Sequence, Tuple

import torch

from ..config import MAX_LOGPROBS as TOP_LOGPROBS  # the most top log-probs a request may ask for

Tensor = torch.Tensor
_M32 = 0xFFFFFFFF


@dataclass
class SamplingParams:
    """Per-slot parameters, device tensors [S]: temperature (0 = greedy), top_k (0 = all), top_p (1 = all),
    seed (any int64) and counter (the index of the token being chosen: 0 for the first)."""

    temperature: Tensor  # float32
    top_k: Tensor  # int64
    top_p: Tensor  # float32
    seed: Tensor  # int64
    counter: Tensor  # int64

    @classmethod
    def allocate(cls, slots: int, device: torch.device) -> "SamplingParams":
        z = lambda dtype: torch.zeros(slots, dtype=dtype, device=device)  # noqa: E731
        return cls(z(torch.float32), z(torch.long), torch.ones(slots, device=device), z(torch.long), z(torch.long))

    def fill(self, settings: Sequence[Any]) -> None:
        """Copy each row's ``temperature``, ``top_k``, ``top_p``, ``seed`` and ``counter`` (0 where it has none:
        a request's first token) into these tensors in place (a captured step reads their addresses); None rows
        (idle slots) are greedy."""
        def value(r: Any, name: str, idle: float) -> float:
            if r is None:
                return idle
            return getattr(r, "counter", 0) if name == "counter" else getattr(r, name)

        for name, idle in (("temperature", 0.0), ("top_k", 0), ("top_p", 1.0), ("seed", 0), ("counter", 0)):
            dst = getattr(self, name)
            dst.copy_(torch.tensor([value(r, name, idle) for r in settings], dtype=dst.dtype))


@dataclass(frozen=True)
class SamplerWork:
    """What one call of :func:`sample` must compute for its rows, known on the host from their settings (a
    decode loop keeps a CUDA graph per kind): ``draw``, some row samples (temperature > 0); ``filter``, some
    drawing row keeps only its top-k / top-p; ``logprobs``, some row asks for log-probs. A greedy batch without
    log-probs is one argmax instead of a sort, a hash and a log-softmax over the vocabulary. A row gets the
    same token whatever work its batch does."""

    draw: bool = True
    filter: bool = True
    logprobs: bool = True

    @classmethod
    def of(cls, settings: Iterable[Any]) -> "SamplerWork":
        """``settings``: objects with ``temperature``, ``top_k``, ``top_p`` and ``logprobs`` (a request's, a
        slot's); None entries (idle slots) need nothing."""
        rows = [r for r in settings if r is not None]
        drawing = [r for r in rows if r.temperature > 0]
        return cls(bool(drawing), any(r.top_k > 0 or r.top_p < 1 for r in drawing),
                   any(r.logprobs > 0 for r in rows))


def _mul32(x: Tensor, c: int) -> Tensor:
    """(x * c) mod 2**32 for x in [0, 2**32), in int64 without overflow (16-bit halves)."""
    return ((x & 0xFFFF) * c + (((x >> 16) * c & 0xFFFF) << 16)) & _M32


def _hash32(x: Tensor) -> Tensor:
    """A 32-bit integer mix (lowbias32), exact in int64 arithmetic."""
    x = x & _M32
    x = x ^ (x >> 16)
    x = _mul32(x, 0x7FEB352D)
    x = x ^ (x >> 15)
    x = _mul32(x, 0x846CA68B)
    return x ^ (x >> 16)


def uniform_noise(seed: Tensor, counter: Tensor, ids: Tensor) -> Tensor:
    """U in (0, 1), float64, for seed, counter [S] and vocabulary ids [S, V] (int64): a pure function of the
    three, so independent of the batch around it."""
    base = _hash32(_hash32(seed & _M32) ^ _hash32((seed >> 32) & _M32) * 3 + counter)  # [S]
    h = _hash32(_hash32(base[:, None] ^ ids) + ids * 0x9E37)
    return (h.double() + 0.5) / 2.0 ** 32


def sample(logits: Tensor, p: SamplingParams, work: SamplerWork = SamplerWork()
           ) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """logits [S, V] float32 -> (token [S] int64, its log-prob [S], top ids [S, T], top log-probs [S, T]),
    T = min(TOP_LOGPROBS, V). Log-probs are the model's own distribution (log-softmax of the raw logits, before
    temperature and filtering); zeros where ``work`` has no ``logprobs``. Rows with temperature 0 take the
    argmax: exactly the greedy token. ``work`` must cover every row's settings (:meth:`SamplerWork.of`)."""
    s, v = logits.shape
    token = torch.argmax(logits, dim=-1)
    if work.draw:
        temp = torch.where(p.temperature > 0, p.temperature, torch.ones_like(p.temperature))
        scaled = logits / temp[:, None]
        rank = torch.arange(v, device=logits.device)
        ids, keep = rank.expand(s, v), None
        if work.filter:  # sorted, so that top-k and top-p are prefixes
            scaled, ids = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(scaled, dim=-1)
            k = torch.where(p.top_k > 0, p.top_k, v)
            # top-p keeps the smallest prefix whose mass reaches top_p: a token stays if the mass before it is < top_p
            keep = (rank[None, :] < k[:, None]) & ((torch.cumsum(probs, dim=-1) - probs) < p.top_p[:, None])
            keep[:, 0] = True
        # each token's noise is a function of its id, so the draw is the same sorted or not
        noisy = scaled.double() - torch.log(-torch.log(uniform_noise(p.seed, p.counter, ids)))
        if keep is not None:
            noisy = torch.where(keep, noisy, -torch.inf)
        sampled = ids.gather(1, noisy.argmax(dim=-1, keepdim=True))[:, 0]
        token = torch.where(p.temperature > 0, sampled, token)
    t = min(TOP_LOGPROBS, v)
    if not work.logprobs:
        zeros = logits.new_zeros(s, t)
        return token, logits.new_zeros(s), zeros.long(), zeros
    logp = torch.log_softmax(logits, dim=-1)
    top_lp, top_ids = torch.topk(logp, t, dim=-1)
    return token, logp.gather(1, token[:, None])[:, 0], top_ids, top_lp
