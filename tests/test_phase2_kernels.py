"""Phase 2's kernels. The decode kernels (a fixed KV buffer, its valid length a device tensor): the masked torch
and the Triton split-KV kernel (run by Triton's interpreter on CPU, conftest sets TRITON_INTERPRET) against
a float64 softmax over exactly the valid keys; the fused merge against the torch merge; the fused RoPE against
the rotate-half formula. On a GPU machine the same tests run compiled on CUDA; bf16 is checked there
(tests/test_gpu.py): the interpreter does not model bf16."""

from __future__ import annotations

import pytest
import torch

from star_mcore.ops.decode_attention import (masked_decode_attention, resolve_decode_kernel,
                                             split_kv_decode_attention, triton_available)
from star_mcore.ops.merge import merge_partials
from test_ops import _dense

# On a GPU machine the same tests run the compiled kernels on CUDA tensors.
DEV = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(not triton_available(), reason="Triton is not installed")
KERNELS = [pytest.param(masked_decode_attention, id="masked"),
           pytest.param(split_kv_decode_attention, id="split_kv", marks=needs_triton)]


def _buffers(b, hq, hk, sq, cap, d, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, sq, d, generator=g).to(dtype)
    k = torch.randn(b, hk, cap, d, generator=g).to(dtype)
    v = torch.randn(b, hk, cap, d, generator=g).to(dtype)
    return q.to(DEV), k.to(DEV), v.to(DEV)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("hq,hk,sq,cap,n,d", [
    (4, 2, 1, 700, 700, 16),    # full buffer, GQA 2
    (4, 2, 1, 700, 333, 16),    # tail masked; several splits, some empty
    (8, 1, 3, 300, 1, 32),      # one valid key; MQA; three query rows each
    (3, 3, 2, 64, 64, 24),      # MHA, head dim not a power of two
    (9, 3, 1, 1100, 1030, 64),  # SmolLM2's heads; the length ends inside a tile
])
def test_decode_kernel_matches_fp64_softmax_over_valid_keys(kernel, hq, hk, sq, cap, n, d):
    q, k, v = _buffers(1, hq, hk, sq, cap, d, seed=cap + n)
    # poison the tail: it must not leak into the result
    k[:, :, n:] = 1e4
    v[:, :, n:] = float("nan")
    out, lse = kernel(q, k, v, torch.tensor([n], device=DEV), d ** -0.5)
    ref_o, ref_l = _dense(q, k[:, :, :n], v[:, :, :n], torch.ones(sq, n, dtype=torch.bool, device=DEV))
    assert out.dtype == torch.float32 and lse.dtype == torch.float32
    assert out.shape == (1, hq, sq, d) and lse.shape == (1, hq, sq)
    assert (out.double() - ref_o).abs().max() < 1e-5
    assert (lse.double() - ref_l).abs().max() < 1e-5


@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is meant
@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_kernel_with_no_valid_key_is_a_neutral_partial(kernel):
    q, k, v = _buffers(1, 4, 2, 1, 128, 16, seed=1)
    out, lse = kernel(q, k, v, torch.tensor([0], device=DEV), 0.25)
    assert torch.all(out == 0) and torch.all(torch.isneginf(lse))


@pytest.mark.parametrize("kernel", KERNELS)
def test_decode_kernel_batch_rows_have_their_own_lengths(kernel):
    q, k, v = _buffers(2, 4, 2, 1, 400, 16, seed=2)
    lengths = [400, 57]
    out, lse = kernel(q, k, v, torch.tensor(lengths, device=DEV), 0.25)
    for i, n in enumerate(lengths):
        s = (q[i:i + 1].double() @ k[i:i + 1, :, :n].double().repeat_interleave(2, 1).transpose(-1, -2)) * 0.25
        ref_o = torch.softmax(s, -1) @ v[i:i + 1, :, :n].double().repeat_interleave(2, 1)
        assert (out[i:i + 1].double() - ref_o).abs().max() < 1e-5
        assert (lse[i:i + 1].double() - torch.logsumexp(s, -1)).abs().max() < 1e-5


@needs_triton
@pytest.mark.filterwarnings("ignore:divide by zero:RuntimeWarning")  # log(0) = -inf is meant
@pytest.mark.parametrize("n", [1, 2, 5])
def test_fused_merge_equals_torch_merge(n):
    from star_mcore.ops.triton_kernels import merge_rows

    g = torch.Generator().manual_seed(n)
    outs = torch.randn(n, 2, 3, 4, 24, generator=g)
    lses = torch.randn(n, 2, 3, 4, generator=g) * 30
    lses[0, 0, 0, 0] = -float("inf")  # one empty partial
    if n > 1:
        lses[:, 1, 1, 1] = -float("inf")  # a row where every partial is empty
    ref_o, ref_l = merge_partials(outs, lses)  # the torch formula (CPU tensors)
    out, lse = merge_rows(outs.reshape(n, -1, 24).to(DEV), lses.reshape(n, -1).to(DEV))
    out, lse = out.cpu(), lse.cpu()
    assert torch.allclose(out.reshape(ref_o.shape), ref_o, atol=1e-6, rtol=1e-5)
    finite = torch.isfinite(ref_l)
    assert torch.equal(torch.isfinite(lse.reshape(ref_l.shape)), finite)
    assert torch.allclose(lse.reshape(ref_l.shape)[finite], ref_l[finite], atol=1e-5)


def test_resolve_decode_kernel():
    assert resolve_decode_kernel(torch.device("cpu")) is masked_decode_attention
    with pytest.raises(ValueError, match="unknown decode kernel"):
        resolve_decode_kernel(torch.device("cpu"), "fast")


@needs_triton
@pytest.mark.parametrize("s,h,d", [(1, 32, 128), (37, 9, 64), (5, 3, 24)])
def test_fused_rope_equals_the_rotate_half_formula(s, h, d):
    """The Triton RoPE on q as mcore hands it over (a strided view into the fused QKV projection) against the
    rotate-half formula in float64; positions far apart (large angles)."""
    from star_mcore.ops.rope import inv_frequencies, rope_cos_sin
    from star_mcore.ops.triton_kernels import rope_rotate

    g = torch.Generator().manual_seed(s + h)
    qkv = torch.randn(s, 1, h + 2, d, generator=g).to(DEV)
    x = qkv[:, :, :h]  # not contiguous over heads, like mcore's query
    pos = torch.randint(0, 1 << 17, (s,), generator=g)
    cos, sin = rope_cos_sin(pos, inv_frequencies(d, 500000.0).to(DEV))
    out = rope_rotate(x, cos, sin)
    xd, c, si = x.double(), cos.double()[:, None, None, :], sin.double()[:, None, None, :]
    ref = torch.cat([xd[..., : d // 2] * c - xd[..., d // 2:] * si, xd[..., d // 2:] * c + xd[..., : d // 2] * si], -1)
    assert out.is_contiguous() and out.shape == x.shape
    assert (out.double() - ref).abs().max() < 1e-5
