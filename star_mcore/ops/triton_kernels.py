"""Triton kernels of phase 2: split-KV ("flash-decoding") attention of a batch's decode rows over a paged KV pool
whose lengths and page tables are device tensors, the exact LSE merge of n partials in one launch, and RoPE.

Imported only where Triton is (CUDA torch ships it; ``TRITON_INTERPRET=1`` runs these kernels on CPU
tensors, which is how the CPU tests cover them). Shapes are static, lengths live on the device: both kernels
can be captured in a CUDA graph and replayed while the KV length grows.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

Tensor = torch.Tensor
LOG2E = 1.4426950408889634
BLOCK_N = 64  # keys per inner tile
ROWS_PER_PROGRAM = 64  # query rows (members x GQA heads) a program holds: 16 or 128 were slower on an H100


@triton.jit
def _paged_kernel(Q, K, V, TABLE, LENS, MEMBERS, PART, O, L,
                  sq_s, sq_h, sq_r, sk_h, sk_p, sk_n, sv_h, sv_p, sv_n, st_g, sm_g,
                  so_x, so_s, so_h, so_r, sl_x, sl_s, sl_h,
                  HK, G, M, GQ, PAGE, SPLITS, scale_log2,
                  HEAD_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                  BLOCK_G: tl.constexpr, IEEE: tl.constexpr, TILE_IN_PAGE: tl.constexpr):
    """Program (j * HK + h, s, c): the rows of chunk c of group j's members (BLOCK_M // GQ slots x GQ query
    heads) of KV head h against the group's keys [s*split, min((s+1)*split, len_j)), read page by page once for
    all of them. ``split`` is the longest group's length over SPLITS (on the device: the lengths grow without a
    new launch config). A group of many members is cut into chunks so that a program's tile stays in
    registers; its keys are then read once per chunk."""
    jh = tl.program_id(0)
    s = tl.program_id(1)
    c = tl.program_id(2)
    j = jh // HK
    h = jh % HK
    rg = tl.arange(0, BLOCK_G)
    longest = tl.max(tl.load(LENS + rg, mask=rg < G, other=0), 0).to(tl.int32)
    split = tl.cdiv(tl.cdiv(longest, SPLITS), BLOCK_N) * BLOCK_N
    n_len = tl.load(LENS + j).to(tl.int32)
    rm = tl.arange(0, BLOCK_M)
    rd = tl.arange(0, BLOCK_D)
    rn = tl.arange(0, BLOCK_N)
    dmask = rd < HEAD_D
    per_chunk = BLOCK_M // GQ
    local = rm // GQ
    member = c * per_chunk + local
    head = rm % GQ
    valid = (local < per_chunk) & (member < M)
    slot = tl.load(MEMBERS + j * sm_g + member, mask=valid, other=-1)
    rows = valid & (slot >= 0)
    start = s * split
    end = tl.where(tl.max(rows.to(tl.int32), 0) > 0, tl.minimum(start + split, n_len), start)  # no rows: no keys
    q = tl.load(Q + slot[:, None] * sq_s + h * sq_h + head[:, None] * sq_r + rd[None, :],
                mask=rows[:, None] & dmask[None, :], other=0.0)
    m_i = tl.full([BLOCK_M], -float("inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        cols = n0 + rn
        kmask = cols < end
        kv_mask = kmask[:, None] & dmask[None, :]
        if TILE_IN_PAGE:  # the tile lies in one page: one page id, and rows the compiler sees are affine
            page = tl.load(TABLE + j * st_g + n0 // PAGE).to(tl.int64)
            off = n0 % PAGE + rn
        else:  # a page id per key
            page = tl.load(TABLE + j * st_g + cols // PAGE, mask=kmask, other=0).to(tl.int64)[:, None]
            off = cols % PAGE
        k = tl.load(K + h * sk_h + page * sk_p + off[:, None] * sk_n + rd[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + h * sv_h + page * sv_p + off[:, None] * sv_n + rd[None, :], mask=kv_mask, other=0.0)
        if IEEE:
            scores = tl.dot(q, tl.trans(k), input_precision="ieee")
        else:
            scores = tl.dot(q, tl.trans(k))
        scores = tl.where(kmask[None, :], scores * scale_log2, -float("inf"))
        m_new = tl.maximum(m_i, tl.max(scores, 1))  # finite: every tile has a visible key
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(scores - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if IEEE:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        else:
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
        m_i = m_new
    seen = l_i > 0  # an empty split is a neutral partial: out 0, lse -inf
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453, -float("inf"))
    x = tl.load(PART + j) * SPLITS + s
    dst = x * so_x + slot[:, None] * so_s + h * so_h + head[:, None] * so_r + rd[None, :]
    tl.store(O + dst, out, mask=rows[:, None] & dmask[None, :])
    tl.store(L + x * sl_x + slot * sl_s + h * sl_h + head, lse, mask=rows)


@triton.jit
def _merge_kernel(O, L, OUT, LSE, N, so_n, so_r, sl_n, sl_r,
                  HEAD_D: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    """Program r: row r of the n partials -> its merged out and lse (float32); all n partials in one tile."""
    r = tl.program_id(0)
    rs = tl.arange(0, BLOCK_S)
    rd = tl.arange(0, BLOCK_D)
    lses = tl.load(L + rs * sl_n + r * sl_r, mask=rs < N, other=-float("inf")).to(tl.float32)
    m = tl.max(lses, 0)
    m = tl.where(m == -float("inf"), 0.0, m)  # every partial empty: keep exp finite
    w = tl.exp(lses - m)
    total = tl.sum(w, 0)
    o = tl.load(O + rs[:, None] * so_n + r * so_r + rd[None, :], mask=(rs[:, None] < N) & (rd[None, :] < HEAD_D),
                other=0.0).to(tl.float32)
    out = tl.sum(w[:, None] * o, 0) / tl.maximum(total, 1.1754943508222875e-38)
    tl.store(OUT + r * HEAD_D + rd, out, mask=rd < HEAD_D)
    tl.store(LSE + r, m + tl.log(total))


@triton.jit
def _rope_kernel(X, COS, SIN, OUT, R, BH, H, sx_s, sx_b, sx_h, sc,
                 HALF: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_H: tl.constexpr):
    """Rows r = (t, b, h) of x [s, b, h, d], BLOCK_R per program; out is contiguous [s, b, h, d]."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    c = tl.arange(0, BLOCK_H)
    rmask = r < R
    mask = rmask[:, None] & (c[None, :] < HALF)
    t = r // BH
    bi = (r % BH) // H
    hi = r % H
    base = t * sx_s + bi * sx_b + hi * sx_h
    x1 = tl.load(X + base[:, None] + c[None, :], mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(X + base[:, None] + HALF + c[None, :], mask=mask, other=0.0).to(tl.float32)
    cos = tl.load(COS + t[:, None] * sc + c[None, :], mask=mask, other=0.0)
    sin = tl.load(SIN + t[:, None] * sc + c[None, :], mask=mask, other=0.0)
    o = OUT + r[:, None] * (2 * HALF) + c[None, :]
    tl.store(o, (x1 * cos - x2 * sin).to(OUT.dtype.element_ty), mask=mask)
    tl.store(o + HALF, (x2 * cos + x1 * sin).to(OUT.dtype.element_ty), mask=mask)


def rope_rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [s, b, h, d] (last dim contiguous), cos, sin [s, d // 2] float32 (contiguous) -> rotated x, contiguous."""
    s, b, h, d = x.shape
    out = torch.empty((s, b, h, d), dtype=x.dtype, device=x.device)
    rows = s * b * h
    if rows == 0:
        return out
    block_r = 16
    _rope_kernel[(triton.cdiv(rows, block_r),)](x, cos, sin, out, rows, b * h, h, x.stride(0), x.stride(1),
                                               x.stride(2), cos.stride(0), HALF=d // 2, BLOCK_R=block_r,
                                               BLOCK_H=_pow2(d // 2, 16))
    return out


def _pow2(n: int, least: int = 1) -> int:
    return max(least, 1 << max(0, (n - 1).bit_length()))


def paged_split_kv_attention(q: Tensor, k_pool: Tensor, v_pool: Tensor, table: Tensor, lens: Tensor,
                             members: Tensor, part: Tensor, splits: int, scale: float, out: Tensor,
                             lse: Tensor, rows_per_program: int = ROWS_PER_PROGRAM,
                             num_warps: int = 4, num_stages: Optional[int] = None):
    """Partials of a paged step into ``out`` [n_parts * splits, S, hk, g, d], ``lse`` [n_parts * splits, S, hk, g]
    (float32; rows no group writes keep what they hold). q [S, hk, g, d]; k, v pools [hk, pages, page, d];
    table [G, W] int32, lens [G] int32, members [G, M] int64, part [G] int64 (see ops.paged_attention).
    ``rows_per_program`` caps a program's query rows (at least one member's g rows); ``num_warps`` (4) and
    ``num_stages`` (Triton's default): the defaults were the fastest or within noise of it on an H100
    (docs/bench/paged_kernel_h100.json). Returns Triton's compiled kernel (registers, spills: the benchmark's)."""
    s, hk, g, d = q.shape
    G, M = members.shape
    if G == 0:
        return None
    for t in (q, k_pool, v_pool, out):
        if t.stride(-1) != 1:
            raise ValueError("paged_split_kv_attention needs the head dimension contiguous")
    block_m = min(_pow2(M * g, 16), max(_pow2(rows_per_program, 16), _pow2(g, 16)))
    chunks = -(-M // (block_m // g))
    stages = {} if num_stages is None else {"num_stages": num_stages}
    return _paged_kernel[(G * hk, splits, chunks)](
        q, k_pool, v_pool, table, lens, members, part, out, lse,
        q.stride(0), q.stride(1), q.stride(2), k_pool.stride(0), k_pool.stride(1), k_pool.stride(2),
        v_pool.stride(0), v_pool.stride(1), v_pool.stride(2), table.stride(0), members.stride(0),
        out.stride(0), out.stride(1), out.stride(2), out.stride(3), lse.stride(0), lse.stride(1), lse.stride(2),
        hk, G, M, g, k_pool.shape[2], splits, scale * LOG2E,
        HEAD_D=d, BLOCK_M=block_m, BLOCK_D=_pow2(d, 16), BLOCK_N=BLOCK_N, BLOCK_G=_pow2(G, 2),
        IEEE=q.dtype == torch.float32, TILE_IN_PAGE=k_pool.shape[2] % BLOCK_N == 0, num_warps=num_warps, **stages)


def merge_rows(outs: Tensor, lses: Tensor) -> Tuple[Tensor, Tensor]:
    """outs [n, R, d] (any float dtype, last dim contiguous), lses [n, R] -> out [R, d], lse [R] (float32)."""
    n, r, d = outs.shape
    if outs.stride(-1) != 1:
        raise ValueError("merge_rows needs the head dimension contiguous")
    out = torch.empty(r, d, dtype=torch.float32, device=outs.device)
    lse = torch.empty(r, dtype=torch.float32, device=outs.device)
    _merge_kernel[(r,)](outs, lses, out, lse, n, outs.stride(0), outs.stride(1), lses.stride(0), lses.stride(1),
                        HEAD_D=d, BLOCK_S=_pow2(n, 2), BLOCK_D=_pow2(d, 16))
    return out, lse


__all__ = ["paged_split_kv_attention", "merge_rows", "rope_rotate"]
