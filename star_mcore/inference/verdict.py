"""The per-step verdict, the one place it is decided and read: for every row of a phase-2 forward (a request's
query pass, or one slot of a decode step) the query host computes the logits, chooses the next token (greedy or
sampled, :mod:`star_mcore.ops.sampling`), flags non-finite values, and broadcasts it all to the other hosts in
one packed tensor, so every rank continues with the same tokens and the same failures."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from ..ops.sampling import TOP_LOGPROBS, SamplerWork, SamplingParams, sample
from ..parallel.context_parallel import broadcast_from_last
from .host import Host
from .requests import RequestError

Tensor = torch.Tensor


class NumericalError(RequestError):
    """NaN/Inf in a request's attention outputs or logits; reported in that request's output line."""


def width(vocab_size: int) -> int:
    """Columns of a packed verdict row: token, flags, its log-prob, then T top ids and T top log-probs."""
    return 3 + 2 * min(TOP_LOGPROBS, vocab_size)


def decide(host: Host, hidden: Tensor, params: SamplingParams, work: SamplerWork, out: Tensor) -> Optional[Tensor]:
    """hidden [rows, 1, h] (one row per request: its last position) -> ``out`` [rows, width] float64 on the
    device, the same on every host. flags: the first layer whose attention output was not finite for that row,
    num_layers if none, num_layers + 1 if only its logits were not. ``work``: what the rows' settings need of
    the sampler. Returns the query host's float32 logits [rows, vocab] (None elsewhere). No host sync."""
    g, m = host.groups, host.model
    n_layers = m.arch.num_layers
    logits = None
    if g.is_query_host:  # only the query host needs logits; the others learn the verdict below
        logits = m.logits(hidden)
        token, logprob, top_ids, top_lp = sample(logits, params, work)
        bad = m.runtime.first_nonfinite_layer()
        flags = torch.where(~torch.isfinite(logits).all(dim=-1) & (bad == n_layers), n_layers + 1, bad)
        t = top_ids.shape[1]
        out[:, 0] = token
        out[:, 1] = flags
        out[:, 2] = logprob
        out[:, 3:3 + t] = top_ids
        out[:, 3 + t:] = top_lp
    broadcast_from_last(out, g.cp)
    return logits


@dataclass(frozen=True)
class Choice:
    """One row's verdict, read on the host."""

    token: int
    error: Optional[str]  # why the request fails at this step, or None
    logprob: float
    top: List[Tuple[int, float]]  # (id, log-prob), best first

    @classmethod
    def read(cls, row: List[float], num_layers: int, step: int) -> "Choice":
        """``row``: a packed verdict row on the host; ``step``: the token's index (0: the query pass)."""
        t = (len(row) - 3) // 2
        flags = int(row[1])
        error = None
        if flags < num_layers:
            error = (f"non-finite values (NaN/Inf) in the attention output of layer {flags} during phase 2 "
                     f"(step {step})")
        elif flags == num_layers + 1:
            error = f"non-finite logits during phase 2 (step {step})"
        return cls(int(row[0]), error, row[2], [(int(i), lp) for i, lp in zip(row[3:3 + t], row[3 + t:])])
