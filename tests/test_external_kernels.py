"""The FlashAttention 2/3/4 and TransformerEngine adapters on CPU, against stand-in modules.

Each stand-in has its library's real entry point as read in the library's source: the argument names
(no **kwargs, so a wrong name fails), [b, s, h, d] tensors with GQA, the causal mask's alignment, the
return tuple and the LSE's shape. It computes with plain float64 math, so the adapters can be checked
for exactness here; the real kernels run in tests/test_gpu.py.
"""

from __future__ import annotations

import sys
import types

import pytest
import torch

from star_mcore.config import ATTENTION_BACKENDS
from star_mcore.ops import BACKENDS, attend, attend_prefix_causal, math_attention, resolve_backend
from star_mcore.ops import attention as attn_mod
from test_ops import _qkv

CUDA = torch.device("cuda")  # resolve_backend only looks at .type: nothing here touches a GPU


def _softmax_bshd(q, k, v, scale, causal, bottom_right):
    """q [b, sq, h, d], k/v [b, sk, hk, d] -> out [b, sq, h, d] (q's dtype, contiguous), lse [b, h, sq]."""
    assert q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1, "last dim must be contiguous"
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    assert k.shape == v.shape == (b, sk, hk, d) and h % hk == 0
    scale = d ** -0.5 if scale is None else scale
    qh, kh, vh = (x.transpose(1, 2).double() for x in (q, k, v))
    kh, vh = kh.repeat_interleave(h // hk, 1), vh.repeat_interleave(h // hk, 1)
    s = qh @ kh.transpose(-1, -2) * scale
    if causal:  # query i sees key j <= i (+ sk - sq when aligned to the bottom right, as FlashAttention)
        s = s.masked_fill(~torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq if bottom_right else 0), float("-inf"))
    out = torch.softmax(s, -1) @ vh
    return out.transpose(1, 2).contiguous().to(q.dtype), torch.logsumexp(s, -1).float()


def _fa2_module():
    """flash_attn 2.8.3, flash_attn/flash_attn_interface.py: flash_attn_func."""
    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                        softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
        out, lse = _softmax_bshd(q, k, v, softmax_scale, causal, bottom_right=True)
        return (out, lse, None) if return_attn_probs else out  # S_dmask only with dropout
    return types.SimpleNamespace(flash_attn_func=flash_attn_func)


def _fa3_module(release):
    """hopper/flash_attn_interface.py. ``main``: flash_attn_func takes return_attn_probs (since PR #1851,
    Aug 2025). ``2.8.0``: no flag, always (out, lse). ``2.8.3``: no flag, out only. flash_attn_with_kvcache
    (return_softmax_lse) is the same in all three."""
    def fwd(q, k, v, softmax_scale, causal, num_splits):
        assert num_splits == 0, "the adapter asks for the split heuristic"
        return _softmax_bshd(q, k, v, softmax_scale, causal, bottom_right=True)

    def flash_attn_func(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                        v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                        pack_gqa=None, deterministic=False, sm_margin=0):
        out, lse = fwd(q, k, v, softmax_scale, causal, num_splits)
        return (out, lse) if release == "2.8.0" else out

    def flash_attn_func_main(q, k, v, softmax_scale=None, causal=False, qv=None, q_descale=None, k_descale=None,
                             v_descale=None, window_size=(-1, -1), attention_chunk=0, softcap=0.0, num_splits=1,
                             pack_gqa=None, deterministic=False, sm_margin=0, return_attn_probs=False):
        out, lse = fwd(q, k, v, softmax_scale, causal, num_splits)
        return (out, lse) if return_attn_probs else out

    def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, qv=None, rotary_cos=None, rotary_sin=None,
                                cache_seqlens=None, cache_batch_idx=None, cache_leftpad=None, page_table=None,
                                cu_seqlens_q=None, cu_seqlens_k_new=None, max_seqlen_q=None, rotary_seqlens=None,
                                q_descale=None, k_descale=None, v_descale=None, softmax_scale=None, causal=False,
                                window_size=(-1, -1), attention_chunk=0, softcap=0.0, rotary_interleaved=True,
                                scheduler_metadata=None, num_splits=0, pack_gqa=None, sm_margin=0,
                                return_softmax_lse=False):
        out, lse = fwd(q, k_cache, v_cache, softmax_scale, causal, num_splits)
        return (out, lse, None, None) if return_softmax_lse else out

    return types.SimpleNamespace(flash_attn_func=flash_attn_func_main if release == "main" else flash_attn_func,
                                 flash_attn_with_kvcache=flash_attn_with_kvcache)


def _fa4_module(with_return_lse=True):
    """flash-attn-4 4.0.0b36, flash_attn/cute/interface.py: flash_attn_func returns (out, lse), lse None
    unless return_lse (or a gradient is needed). Betas before Feb 2026 had no return_lse."""
    def flash_attn_func(q, k, v, qv=None, gather_kv_indices=None, softmax_scale=None, causal=False,
                        window_size=(None, None), learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None,
                        deterministic=False, score_mod=None, score_mod_bwd=None, mask_mod=None, aux_tensors=None,
                        aux_scalars=None, block_sparse_tensors=None, block_sparse_tensors_bwd=None,
                        return_lse=False, gather_bwd_recompute_p=False, gather_bwd_token_chunk=None):
        out, lse = _softmax_bshd(q, k, v, softmax_scale, causal, bottom_right=True)
        return out, (lse if return_lse else None)

    def flash_attn_func_old(q, k, v, softmax_scale=None, causal=False, window_size=(None, None),
                            learnable_sink=None, softcap=0.0, num_splits=1, pack_gqa=None):
        return _softmax_bshd(q, k, v, softmax_scale, causal, bottom_right=True)[0], None

    return types.SimpleNamespace(flash_attn_func=flash_attn_func if with_return_lse else flash_attn_func_old)


def _te_module(release="2.20"):
    """transformer_engine, pytorch/cpp_extensions/fused_attn.py: fused_attn_fwd. TE reads q, k, v by pointer
    (contiguous), takes the batch size from cu_seqlens; 'causal' is the top-left diagonal; with is_training the
    aux tensors are [softmax stats [b, h, sq, 1], rng_state], else None. ``2.20`` (2.20.2): out's layout is
    ``o_format``, sbhd by default whatever the inputs' (read in 2.20.2's source); no max512 backend. ``2.9``: out in
    q's layout. ``1.x`` took qkv_dtype (a tex.DType) where 2.x takes fake_dtype."""
    backends = {"F16_max512_seqlen": 0, "F16_arbitrary_seqlen": 1, "FP8": 2, "No_Backend": 3}
    if release == "2.20":
        backends = {"No_Backend": -1, "F16_arbitrary_seqlen": 1, "FP8": 2}

    def fwd(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype,
            fused_attention_backend, attn_scale, dropout, qkv_layout, attn_bias_type, attn_mask_type):
        assert all(x.is_contiguous() for x in (q, k, v)), "TE ignores strides"
        assert qkv_layout == "bshd_bshd_bshd" and attn_bias_type == "no_bias" and dropout == 0.0
        assert fused_attention_backend == backends["F16_arbitrary_seqlen"] and fake_dtype == q.dtype
        b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
        assert (max_seqlen_q, max_seqlen_kv) == (sq, sk)
        for cu, s in ((cu_seqlens_q, sq), (cu_seqlens_kv, sk)):
            assert cu.dtype == torch.int32 and cu.tolist() == list(range(0, (b + 1) * s, s))
        assert attn_mask_type in ("causal", "no_mask")
        out, lse = _softmax_bshd(q, k, v, attn_scale, attn_mask_type == "causal", bottom_right=False)
        return out, ([lse[..., None], torch.zeros(2, dtype=torch.int64)] if is_training else None)

    def fused_attn_fwd_2_20(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v,
                            fake_dtype, fused_attention_backend, attn_bias=None, cu_seqlens_q_padded=None,
                            cu_seqlens_kv_padded=None, page_table_k=None, page_table_v=None, s_quantizer=None,
                            o_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d",
                            o_format="sbhd", qkv_scale_inv_format=None, attn_bias_type="no_bias",
                            attn_mask_type="padding", softmax_type="vanilla", window_size=(-1, -1),
                            bottom_right_diagonal=None, rng_gen=None, softmax_offset=None, return_max_logit=False,
                            cuda_graph=False):
        out, aux = fwd(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype,
                       fused_attention_backend, attn_scale, dropout, qkv_layout, attn_bias_type, attn_mask_type)
        assert o_format in ("bshd", "sbhd")
        return (out if o_format == "bshd" else out.transpose(0, 1).contiguous()), aux

    def fused_attn_fwd_2_9(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v,
                           fake_dtype, fused_attention_backend, attn_bias=None, cu_seqlens_q_padded=None,
                           cu_seqlens_kv_padded=None, page_table_k=None, page_table_v=None, s_quantizer=None,
                           o_quantizer=None, attn_scale=None, dropout=0.0, fast_zero_fill=True, qkv_layout="sbh3d",
                           attn_bias_type="no_bias", attn_mask_type="padding", softmax_type="vanilla",
                           window_size=(-1, -1), rng_gen=None, softmax_offset=None, return_max_logit=False):
        return fwd(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, fake_dtype,
                   fused_attention_backend, attn_scale, dropout, qkv_layout, attn_bias_type, attn_mask_type)

    def fused_attn_fwd_1x(is_training, max_seqlen_q, max_seqlen_kv, cu_seqlens_q, cu_seqlens_kv, q, k, v, qkv_dtype,
                          fused_attention_backend, attn_bias=None, attn_scale=None, dropout=0.0, fast_zero_fill=True,
                          qkv_layout="sbh3d", attn_bias_type="no_bias", attn_mask_type="padding"):
        raise AssertionError("TE 1.x is refused before any call")

    calls = {"2.20": fused_attn_fwd_2_20, "2.9": fused_attn_fwd_2_9, "1.x": fused_attn_fwd_1x}
    return types.SimpleNamespace(FusedAttnBackend=backends, fused_attn_fwd=calls[release])


STAND_INS = {
    "flash_attn2": ("flash_attn", _fa2_module),
    "flash_attn3 main": ("flash_attn_interface", lambda: _fa3_module("main")),
    "flash_attn3 2.8.0": ("flash_attn_interface", lambda: _fa3_module("2.8.0")),
    "flash_attn3 2.8.3": ("flash_attn_interface", lambda: _fa3_module("2.8.3")),
    "flash_attn4": ("flash_attn.cute", _fa4_module),
    "te 2.20": ("transformer_engine.pytorch.cpp_extensions.fused_attn", _te_module),
    "te 2.9": ("transformer_engine.pytorch.cpp_extensions.fused_attn", lambda: _te_module("2.9")),
}


@pytest.fixture(params=list(STAND_INS))
def backend(request, monkeypatch):
    """(backend name, its function) with the library replaced by its stand-in."""
    module, make = STAND_INS[request.param]
    monkeypatch.setitem(sys.modules, module, make())
    name = request.param.split()[0]
    assert resolve_backend(name, CUDA, torch.bfloat16) is BACKENDS[name]
    return name, BACKENDS[name]


def _close(got, ref):
    (o, l), (ro, rl) = got, ref
    assert o.shape == ro.shape and o.dtype == ro.dtype and l.shape == rl.shape and l.dtype == torch.float32
    assert (o - ro).abs().max() < 1e-5 and (l - rl).abs().max() < 1e-5


@pytest.mark.parametrize("hq,hk,sq,sk,causal", [
    (4, 4, 9, 9, True), (4, 2, 9, 9, True), (4, 1, 9, 9, True),  # causal, MHA / GQA / MQA
    (4, 4, 5, 13, False), (4, 2, 5, 13, False),                     # a block against other keys
    (8, 2, 1, 300, False), (8, 8, 1, 300, False),                   # decode: one query, long KV
])
def test_adapter_matches_math(backend, hq, hk, sq, sk, causal):
    _, fn = backend
    q, k, v = _qkv(hq=hq, hk=hk, sq=sq, sk=sk, seed=sq + sk + hk)
    _close(attend(fn, q, k, v, causal=causal), attend(math_attention, q, k, v, causal=causal))
    _close(fn(q, k, v, causal=causal, scale=0.3), math_attention(q, k, v, causal=causal, scale=0.3))


def test_adapter_prefix_causal_matches_math(backend):
    _, fn = backend
    q, k, v = _qkv(hq=4, hk=2, sq=6, sk=16, seed=7)
    args = (q, k[:, :, :10], v[:, :, :10], k[:, :, 10:], v[:, :, 10:])
    _close(attend_prefix_causal(fn, *args), attend_prefix_causal(math_attention, *args))


def test_adapter_keeps_half_precision(backend):
    _, fn = backend
    q, k, v = _qkv(hq=4, hk=2, sq=3, sk=8, dtype=torch.bfloat16)
    out, lse = attend(fn, q, k, v)
    assert out.dtype == torch.bfloat16 and out.shape == (1, 4, 3, 16) and lse.dtype == torch.float32


@pytest.mark.parametrize("name,module", [(n, m) for n, (m, _) in attn_mod.LIBRARIES.items()])
def test_missing_library_is_refused_with_one_line(monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # import fails, whatever is installed
    with pytest.raises(ValueError, match=f"attention backend '{name}' needs the module {module} ") as e:
        resolve_backend(name, CUDA, torch.float16)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("name", list(attn_mod.LIBRARIES))
def test_external_backends_need_cuda_and_half(name):
    with pytest.raises(ValueError, match=f"attention backend '{name}' needs a CUDA device"):
        resolve_backend(name, torch.device("cpu"), torch.bfloat16)
    with pytest.raises(ValueError, match=f"attention backend '{name}' needs fp16 or bf16"):
        resolve_backend(name, CUDA, torch.float32)


def test_a_flash_attn_package_without_fa2_is_refused(monkeypatch):
    """flash-attn-4 alone installs `flash_attn` (only its `cute` subpackage): that is not FlashAttention-2."""
    monkeypatch.setitem(sys.modules, "flash_attn", types.ModuleType("flash_attn"))
    with pytest.raises(ValueError, match="needs flash_attn.flash_attn_func .* the module here has none"):
        resolve_backend("flash_attn2", CUDA, torch.bfloat16)


def test_versions_without_the_lse_call_are_refused(monkeypatch):
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fa4_module(with_return_lse=False))
    with pytest.raises(ValueError, match="no return_lse"):
        resolve_backend("flash_attn4", CUDA, torch.bfloat16)
    monkeypatch.setitem(sys.modules, "transformer_engine.pytorch.cpp_extensions.fused_attn", _te_module("1.x"))
    with pytest.raises(ValueError, match="needs transformer-engine 2.x"):
        resolve_backend("te", CUDA, torch.bfloat16)


@pytest.mark.parametrize("capability,fa3,fa4,blocks,decode", [
    ((9, 0), True, True, "flash_attn4", "flash_attn3"),
    ((9, 0), True, False, "flash_attn3", "flash_attn3"),
    ((9, 0), False, True, "flash_attn4", "sdpa_flash"),
    ((9, 0), False, False, "sdpa_cudnn", "sdpa_flash"),
    ((8, 0), True, True, "sdpa_cudnn", "sdpa_flash"),
    ((10, 0), True, True, "sdpa_cudnn", "sdpa_flash")])
def test_auto_takes_the_measured_fastest_importable_kernel_per_phase(monkeypatch, capability, fa3, fa4, blocks,
                                                                     decode):
    monkeypatch.setitem(sys.modules, "flash_attn_interface", _fa3_module("main") if fa3 else None)
    monkeypatch.setitem(sys.modules, "flash_attn.cute", _fa4_module() if fa4 else None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    for dtype in (torch.bfloat16, torch.float16):
        fn = resolve_backend("auto", CUDA, dtype)
        assert (fn.blocks, fn.decode) == (BACKENDS[blocks], BACKENDS[decode])
    assert resolve_backend("auto", CUDA, torch.float32) is BACKENDS["sdpa_efficient"]


def test_auto_sends_blocks_and_decode_to_their_kernels():
    calls = []
    fake = lambda tag: lambda q, k, v, causal, scale: calls.append((tag, q.shape[2])) or (q, q[..., 0])  # noqa: E731
    fn = attn_mod.AutoCuda(blocks=fake("blocks"), decode=fake("decode"))
    for sq in (1, 255, 256, 4096):
        fn(torch.zeros(1, 1, sq, 2), None, None)
    assert calls == [("decode", 1), ("decode", 255), ("blocks", 256), ("blocks", 4096)]


def test_config_accepts_exactly_the_backends():
    assert ATTENTION_BACKENDS == ("auto", *BACKENDS)
