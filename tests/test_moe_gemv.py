"""One-token experts as GEMVs (moelab.kernels.moe_gemv) against their torch twin and fused_moe's reference, under
the interpreter (fp32 / fp16) and compiled on a GPU (bf16, against fused_moe's tensor-core path)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV, needs_gpu

from moelab.kernels.fused_moe import fused_moe, fused_moe_ref
from moelab.kernels.moe_gemv import MoeGemvConfig, applies, moe_gemv, moe_gemv_ref, set_enabled
from moelab.layers.moe.quant import QuantScales, dequantize, quantize_experts


def _inputs(E: int, K: int, D: int, I: int, dtype: torch.dtype, seed: int, same_expert: bool = False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(1, D, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * I, D, generator=g) / D ** 0.5).to(dtype)
    w2 = (torch.randn(E, D, I, generator=g) / I ** 0.5).to(dtype)
    ids = torch.full((1, K), 2) if same_expert else torch.randperm(E, generator=g)[:K].view(1, K)
    wts = torch.rand(1, K, generator=g).softmax(-1)
    return [t.to(DEV) for t in (x, ids, wts, w13, w2)]


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("E,K,D,I,configs", [
    (6, 2, 96, 80, None),  # sizes that are no multiple of the chunks or the row blocks
    (8, 3, 64, 48, (MoeGemvConfig(4, 16, 2), MoeGemvConfig(8, 16, 2))),  # several K chunks in both kernels
    (4, 1, 32, 40, (MoeGemvConfig(1, 32, 1), MoeGemvConfig(2, 64, 1))),
])
def test_moe_gemv_matches_the_references(dtype, tol, E, K, D, I, configs):
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, dtype, seed=E * K + D)
    got = moe_gemv(x, ids, wts, w13, w2, configs)
    want = moe_gemv_ref(x, ids, wts, w13, w2)
    assert got.shape == (K, D) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    summed = fused_moe_ref(x, ids, wts, w13, w2).float()
    assert torch.allclose(got.float().sum(0, keepdim=True), summed, atol=5 * tol, rtol=5 * tol)


def test_moe_gemv_slots_on_the_same_expert_and_bad_shapes():
    x, ids, wts, w13, w2 = _inputs(4, 3, 32, 16, torch.float32, seed=1, same_expert=True)
    got = moe_gemv(x, ids, wts, w13, w2)
    assert torch.allclose(got, moe_gemv_ref(x, ids, wts, w13, w2), atol=1e-5)
    assert torch.allclose(got / wts.view(-1, 1), (got[0] / wts[0, 0]).expand(3, -1), atol=1e-5)
    with pytest.raises(ValueError, match="one token"):
        moe_gemv(x.expand(2, -1), ids.expand(2, -1), wts.expand(2, -1), w13, w2)
    with pytest.raises(ValueError, match="shapes"):
        moe_gemv(x, ids, wts, w13, w2[:, :, :8])
    assert not applies(x.cpu(), w13.cpu(), None)  # the dispatch is for a GPU only


@needs_gpu
@pytest.mark.parametrize("E,K,D,I", [(64, 8, 2048, 1024), (60, 4, 2048, 1408), (8, 2, 512, 1792)])
def test_cuda_bf16_moe_gemv_agrees_with_the_tensor_core_path(E, K, D, I):
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, torch.bfloat16, seed=K)
    assert applies(x, w13, None)
    got = fused_moe(x, ids, wts, w13, w2)  # dispatches to moe_gemv
    set_enabled(False)
    try:
        tc = fused_moe(x, ids, wts, w13, w2)
    finally:
        set_enabled(True)
    want = fused_moe_ref(x, ids, wts, w13, w2).float()
    err = lambda y: ((y.float() - want).norm() / want.norm()).item()  # noqa: E731
    assert err(got) < 1e-2 and err(tc) < 1e-2 and abs(err(got) - err(tc)) < 5e-3


FORMATS = ["fp8_tensor", "fp8_channel", "fp8_block", "int8_channel"]


def _quantized(fmt: str, E: int, K: int, D: int, I: int, seed: int):
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, torch.float32, seed)
    q13, q2, s = quantize_experts(w13.cpu(), w2.cpu(), fmt)
    d13, d2 = dequantize(q13, q2, s)
    return x, ids, wts, [t.to(DEV) for t in (q13, q2, s.w13_scale, s.w2_scale, d13, d2)]


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("E,K,D,I,configs", [
    (6, 2, 300, 200, None),  # block scales over ragged blocks (300 = 2 x 128 + 44), chunks of 512 and 256
    (4, 2, 256, 192, (MoeGemvConfig(8, 64, 2), MoeGemvConfig(16, 64, 2))),  # chunks inside one scale block
    (4, 2, 512, 256, (MoeGemvConfig(4, 256, 2), MoeGemvConfig(8, 128, 2))),  # two scale blocks a chunk
])
def test_quantized_moe_gemv_computes_with_the_dequantized_weights(fmt, E, K, D, I, configs):
    """8-bit weights times their scales, activations unquantized: the twin on the dequantized weights."""
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized(fmt, E, K, D, I, seed=D + I)
    got = moe_gemv(x, ids, wts, q13, q2, configs, quant=fmt, w13_scale=s13, w2_scale=s2)
    want = moe_gemv_ref(x, ids, wts, d13, d2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    # wrong block of scales is seen: scaling one block row of the first expert moves the result
    if fmt == "fp8_block" and 0 in ids:
        s13b = s13.clone()
        s13b[0, -1] *= 2
        assert not torch.allclose(moe_gemv(x, ids, wts, q13, q2, configs, quant=fmt, w13_scale=s13b, w2_scale=s2),
                                  got)


def test_quantized_moe_gemv_rejects_bad_scales_and_dtypes():
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized("fp8_channel", 4, 2, 64, 32, seed=3)
    with pytest.raises(ValueError, match="wants float32 scales of shape"):
        moe_gemv(x, ids, wts, q13, q2, quant="fp8_channel", w13_scale=s13[:, :8], w2_scale=s2)
    with pytest.raises(ValueError, match="available: fp8_tensor"):
        moe_gemv(x, ids, wts, q13, q2, quant="fp4", w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="int8_channel weights must be torch.int8"):
        moe_gemv(x, ids, wts, q13, q2, quant="int8_channel", w13_scale=s13, w2_scale=s2)
    assert not applies(x.cpu(), q13.cpu(), "fp8_channel")


@needs_gpu
@pytest.mark.parametrize("fmt", FORMATS)
def test_cuda_quantized_moe_gemv_against_both_oracles(fmt):
    """bf16 x, 8-bit weights on the GPU: close to the dequantized weights' float32 result (weights-only
    quantization), and no further from the unquantized one than the tensor cores' W8A8 / W8A16 path."""
    E, K, D, I = 64, 8, 2048, 1024
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, torch.float32, seed=5)
    q13, q2, s = quantize_experts(w13, w2, fmt)
    d13, d2 = dequantize(q13, q2, s)
    xb = x.to(torch.bfloat16)
    assert applies(xb, q13, fmt)
    got = fused_moe(xb, ids, wts, q13, q2, quant=fmt, w13_scale=s.w13_scale, w2_scale=s.w2_scale)
    set_enabled(False)
    try:
        tc = fused_moe(xb, ids, wts, q13, q2, quant=fmt, w13_scale=s.w13_scale, w2_scale=s.w2_scale)
    finally:
        set_enabled(True)
    deq = fused_moe_ref(xb.float(), ids, wts, d13, d2).float()
    full = fused_moe_ref(xb.float(), ids, wts, w13, w2).float()
    err = lambda y, ref: ((y.float() - ref).norm() / ref.norm()).item()  # noqa: E731
    assert err(got, deq) < 1e-2
    assert err(got, full) <= err(tc, full) + 2e-3


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("D,I,configs", [
    (256, 192, (MoeGemvConfig(8, 256, 2), MoeGemvConfig(16, 128, 2))),  # two scale blocks a gate_up chunk
    (320, 96, (MoeGemvConfig(8, 64, 2), MoeGemvConfig(16, 32, 1))),  # ragged blocks, chunks inside one block
])
def test_packed_words_give_the_element_path(fmt, D, I, configs):
    """8-bit weights read as int32 words and unpacked with integer operations (bf16 x): the values of the
    element-wise conversion path, and of the twin on the dequantized weights, including fp8 subnormals, zeros and
    both signs, and int8's -127..127."""
    E, K = 4, 2
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized(fmt, E, K, D, I, seed=D)
    if fmt != "int8_channel":  # every e4m3 byte but NaN in the weights of the experts used
        codes = torch.arange(256, dtype=torch.uint8)
        codes = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).to(DEV)
        q13.view(-1)[: codes.numel()] = codes
        q2.view(-1)[: codes.numel()] = codes
        q13[ids[0, 0]] = q13[0]
        q2[ids[0, 0]] = q2[0]
        d13, d2 = dequantize(q13.cpu(), q2.cpu(), QuantScales(fmt, s13.cpu(), s2.cpu()))
        d13, d2 = d13.to(DEV), d2.to(DEV)
    xb = (x * 3).to(torch.bfloat16)
    kw = dict(quant=fmt, w13_scale=s13, w2_scale=s2)
    words = moe_gemv(xb, ids, wts, q13, q2, configs, packed=True, **kw)
    elems = moe_gemv(xb, ids, wts, q13, q2, configs, packed=False, **kw)
    assert torch.allclose(words.float(), elems.float(), atol=1e-2, rtol=1e-2)
    want = moe_gemv_ref(xb.float(), ids, wts, d13, d2)
    assert torch.allclose(words.float(), want, atol=2e-2, rtol=2e-2), (words.float() - want).abs().max()


def test_packed_needs_what_it_reads():
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized("int8_channel", 4, 2, 64, 32, seed=3)
    with pytest.raises(ValueError, match="packed=True needs 8-bit weights, bf16 x"):
        moe_gemv(x, ids, wts, q13, q2, quant="int8_channel", w13_scale=s13, w2_scale=s2, packed=True)
