"""Attention of a batch of decode rows over a paged KV pool: phase 2's batched step. Each request's keys are
its groups' pages; a context shared by several requests is one group whose keys are read once for all of its
members' rows (shared-prefix, "cascade" attention). Static shapes, lengths and page tables on the device: the
step can be captured in a CUDA graph and replayed while the batch's lengths grow.

    pool        k, v [hk, pages, page_size, d] of one layer (page 0 is scratch: never part of a group)
    q           [S, hk, g, d]       one new token per slot (S slots), the g query heads of each KV head folded
    layout      G groups: table [G, W] int32 page ids, lens [G] int32 keys, members [G, M] int64 slot ids
                (-1: none), part [G] int64 in [0, n_parts): which partial of its members the group gives
    out, lse    [S, hk, g, d] float32, [S, hk, g]: every slot's exact attention over the union of its groups

A slot's partials (its context's group, its own tokens' group, the kernel's splits) are merged by LSE; a slot in
no group gets out 0, lse -inf (a neutral partial for the merge across hosts).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Tuple

import torch

from .merge import merge_partials
from .triton_support import triton_available

Tensor = torch.Tensor


@dataclass
class PagedLayout:
    """Which keys each group of a step attends to, and whose rows it serves (device tensors, see module)."""

    table: Tensor  # [G, W] int32
    lens: Tensor  # [G] int32
    members: Tensor  # [G, M] int64
    part: Tensor  # [G] int64
    n_parts: int
    splits: int = 1  # programs per (group, KV head) of the Triton kernel (static: part of a captured graph)


PagedKernel = Callable[[Tensor, Tensor, Tensor, PagedLayout, float], Tuple[Tensor, Tensor]]


def _neutral(q: Tensor, n: int) -> Tuple[Tensor, Tensor]:
    s, hk, g, d = q.shape
    out = torch.zeros(n, s, hk, g, d, dtype=torch.float32, device=q.device)
    return out, torch.full((n, s, hk, g), -math.inf, dtype=torch.float32, device=q.device)


def paged_attention_reference(q: Tensor, k_pool: Tensor, v_pool: Tensor, layout: PagedLayout,
                              scale: float) -> Tuple[Tensor, Tensor]:
    """float32 softmax per group over its own keys only (a group's work is its length, not the longest's: the
    CPU path runs the batch's idle and short groups at no cost); any device. It reads the layout on the host
    (dynamic shapes), so it is the CPU path and the reference, not a kernel to capture."""
    s, hk, g, d = q.shape
    page = k_pool.shape[2]
    outs, lses = _neutral(q, layout.n_parts)  # [n_parts, S, hk, g, d], [n_parts, S, hk, g]
    keys_k, keys_v = k_pool.reshape(hk, -1, d), v_pool.reshape(hk, -1, d)
    for j, (n, members, part) in enumerate(zip(layout.lens.tolist(), layout.members.tolist(),
                                               layout.part.tolist())):
        rows = [m for m in members if m >= 0]
        if n == 0 or not rows:
            continue
        pages = layout.table[j, : -(-n // page)].tolist()
        if pages == list(range(pages[0], pages[0] + len(pages))):  # one run of pages: a view, no gather
            keys = slice(pages[0] * page, pages[0] * page + n)
        else:
            keys = (torch.tensor(pages, device=q.device)[:, None] * page
                    + torch.arange(page, device=q.device)).reshape(-1)[:n]
        kf, vf = keys_k[:, keys].float(), keys_v[:, keys].float()  # [hk, n, d]
        qg = q[rows].float().permute(1, 0, 2, 3).reshape(hk, len(rows) * g, d)  # [hk, M*g, d]
        scores = torch.matmul(qg, kf.transpose(-1, -2)) * scale  # [hk, M*g, n]
        lse = torch.logsumexp(scores, dim=-1)
        o = torch.matmul(torch.exp(scores - lse[..., None]), vf)  # [hk, M*g, d]
        idx = torch.tensor(rows, device=q.device)
        outs[part, idx] = o.reshape(hk, len(rows), g, d).permute(1, 0, 2, 3)
        lses[part, idx] = lse.reshape(hk, len(rows), g).permute(1, 0, 2)
    return merge_partials(outs, lses)


def paged_attention_triton(q: Tensor, k_pool: Tensor, v_pool: Tensor, layout: PagedLayout, scale: float,
                           **launch) -> Tuple[Tensor, Tensor]:
    """Triton split-KV kernel: one program per (group, KV head, split, chunk of members) reads its keys once
    for all the chunk's rows; its partials land at (part, split, slot); one fused launch merges them per slot.
    ``launch``: the kernel's tile settings (``rows_per_program``, ``num_warps``, ``num_stages``; the defaults
    were measured on an H100)."""
    from . import triton_kernels as tk

    parts, lses = _neutral(q, layout.n_parts * layout.splits)
    tk.paged_split_kv_attention(q, k_pool, v_pool, layout.table, layout.lens, layout.members, layout.part,
                                layout.splits, scale, parts, lses, **launch)
    s, hk, g, d = q.shape
    out, lse = tk.merge_rows(parts.reshape(parts.shape[0], -1, d), lses.reshape(lses.shape[0], -1))
    return out.reshape(s, hk, g, d), lse.reshape(s, hk, g)


def resolve_paged_kernel(device: torch.device) -> PagedKernel:
    """The Triton kernel on CUDA where Triton imports, else the reference."""
    if device.type == "cuda" and triton_available():
        return paged_attention_triton
    return paged_attention_reference


def split_count(groups: int, hk: int, sms: int) -> int:
    """Splits per (group, KV head) that fill the GPU about twice with ``groups`` busy groups (a power of two,
    so that few distinct counts, and graphs, arise)."""
    want = max(1, -(-2 * sms // max(1, groups * hk)))
    return min(64, 1 << (want - 1).bit_length())
