"""One-token experts as GEMVs (moelab.kernels.moe_gemv) against their torch twin and fused_moe's reference, under
the interpreter (fp32 / fp16) and compiled on a GPU (bf16, against fused_moe's tensor-core path)."""

from __future__ import annotations

import pytest
import torch
from conftest import DEV, needs_gpu

from moelab.kernels.fused_moe import fused_moe, fused_moe_ref
from moelab.kernels.moe_gemv import (
    MoeGemvConfig,
    applies,
    dense_applies,
    gate_up_gemv,
    gate_up_gemv_ref,
    moe_gemv,
    moe_gemv_ref,
    set_enabled,
)
from moelab.layers.moe.quant import dequantize, quantize_experts


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
    # expert ids settled two launches back: gate_up reads them (and its first chunk) before the wait, same bits
    assert torch.equal(moe_gemv(x, ids, wts, w13, w2, configs, routing_settled=True), got)


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
    w2t = w2.transpose(1, 2).contiguous().transpose(1, 2)  # same values, last stride not 1
    with pytest.raises(ValueError, match="unit last stride"):
        moe_gemv(x, ids, wts, w13, w2t)


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


def _quantized(fmt: str, E: int, K: int, D: int, I: int, seed: int):
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, torch.float32, seed)
    q13, q2, s = quantize_experts(w13.cpu(), w2.cpu(), fmt)
    d13, d2 = dequantize(q13, q2, s)
    return x, ids, wts, [t.to(DEV) for t in (q13, q2, s.w13_scale, s.w2_scale, d13, d2)]


@pytest.mark.parametrize("E,K,D,I,configs", [
    (6, 2, 300, 200, None),  # sizes that are no multiple of the chunks
    (4, 2, 256, 192, (MoeGemvConfig(8, 64, 2), MoeGemvConfig(16, 64, 2))),  # several chunks in both kernels
])
def test_int8_moe_gemv_computes_with_the_dequantized_weights(E, K, D, I, configs):
    """int8 weights times their per-row scales, x unquantized (W8A16): the twin on the dequantized weights."""
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized("int8_channel", E, K, D, I, seed=D + I)
    got = moe_gemv(x, ids, wts, q13, q2, configs, quant="int8_channel", w13_scale=s13, w2_scale=s2)
    want = moe_gemv_ref(x, ids, wts, d13, d2)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-4), (got - want).abs().max()
    s2b = s2.clone()
    s2b[ids[0, 0], 0] *= 2  # one row's scale is applied to that row only
    bad = moe_gemv(x, ids, wts, q13, q2, configs, quant="int8_channel", w13_scale=s13, w2_scale=s2b)
    assert not torch.allclose(bad[0, 0], got[0, 0]) and torch.equal(bad[:, 1:], got[:, 1:])


@pytest.mark.parametrize("D,I,configs", [
    (256, 192, (MoeGemvConfig(8, 256, 2), MoeGemvConfig(16, 128, 2))),
    (320, 96, (MoeGemvConfig(8, 64, 2), MoeGemvConfig(16, 32, 1))),  # a partial last chunk in words
])
def test_packed_int8_words_give_the_element_path(D, I, configs):
    """int8 weights read as int32 words and unpacked with integer operations (bf16 x): the values of the
    element-wise conversion, and of the twin, over every int8 code -128..127 and both signs of x."""
    E, K = 4, 2
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized("int8_channel", E, K, D, I, seed=D)
    codes = torch.arange(-128, 128, dtype=torch.int8).to(DEV)
    for q in (q13, q2):
        q[ids[0, 0]].view(-1)[: codes.numel()] = codes
    d13, d2 = q13.float() * s13[:, :, None], q2.float() * s2[:, :, None]
    xb = (x * 3).to(torch.bfloat16)
    kw = dict(quant="int8_channel", w13_scale=s13, w2_scale=s2)
    words = moe_gemv(xb, ids, wts, q13, q2, configs, packed=True, **kw)
    elems = moe_gemv(xb, ids, wts, q13, q2, configs, packed=False, **kw)
    assert torch.allclose(words.float(), elems.float(), atol=1e-2, rtol=1e-2)
    want = moe_gemv_ref(xb.float(), ids, wts, d13, d2)
    assert torch.allclose(words.float(), want, atol=2e-2, rtol=2e-2), (words.float() - want).abs().max()


def test_quantized_moe_gemv_rejects_what_it_does_not_take():
    x, ids, wts, (q13, q2, s13, s2, d13, d2) = _quantized("int8_channel", 4, 2, 64, 32, seed=3)
    kw = dict(w13_scale=s13, w2_scale=s2)
    with pytest.raises(ValueError, match="wants a float32 w13_scale of shape"):
        moe_gemv(x, ids, wts, q13, q2, quant="int8_channel", w13_scale=s13[:, :8], w2_scale=s2)
    with pytest.raises(ValueError, match="the fp8 formats run on fused_moe's tensor cores"):
        moe_gemv(x, ids, wts, q13, q2, quant="fp8_channel", **kw)
    with pytest.raises(ValueError, match="packed=True needs int8 weights, bf16 x"):
        moe_gemv(x, ids, wts, q13, q2, quant="int8_channel", packed=True, **kw)
    with pytest.raises(ValueError, match="int8_channel weights must be torch.int8"):
        moe_gemv(x, ids, wts, d13, d2, quant="int8_channel", **kw)
    assert not applies(x.cpu(), q13.cpu(), "int8_channel")  # a GPU only
    fp8 = q13.cpu().float().to(torch.float8_e4m3fn)
    if torch.cuda.is_available():
        assert not applies(x.cuda(), fp8.cuda(), "fp8_channel") and applies(x.cuda(), q13.cuda(), "int8_channel")


@needs_gpu
def test_cuda_int8_moe_gemv_against_the_tensor_cores():
    """bf16 x, int8 weights on the GPU (the packed path): as close to the dequantized weights' float32 result as
    the tensor cores' W8A16 path."""
    E, K, D, I = 64, 8, 2048, 1024
    x, ids, wts, w13, w2 = _inputs(E, K, D, I, torch.float32, seed=5)
    q13, q2, s = quantize_experts(w13, w2, "int8_channel")
    d13, d2 = dequantize(q13, q2, s)
    xb = x.to(torch.bfloat16)
    kw = dict(quant="int8_channel", w13_scale=s.w13_scale, w2_scale=s.w2_scale)
    assert applies(xb, q13, "int8_channel")
    got = fused_moe(xb, ids, wts, q13, q2, **kw)
    set_enabled(False)
    try:
        tc = fused_moe(xb, ids, wts, q13, q2, **kw)
    finally:
        set_enabled(True)
    deq = fused_moe_ref(xb.float(), ids, wts, d13, d2).float()
    err = lambda y: ((y.float() - deq).norm() / deq.norm()).item()  # noqa: E731
    assert err(got) < 1e-2 and err(got) <= err(tc) + 2e-3


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 2e-3)])
@pytest.mark.parametrize("D,I,config", [(96, 80, None), (64, 48, MoeGemvConfig(4, 16, 2))])
def test_dense_gate_up_gemv_matches_its_twin(dtype, tol, D, I, config):
    """A dense gated MLP's gate and up at one row with silu * mul in the same launch (shared experts)."""
    g = torch.Generator().manual_seed(D)
    x = torch.randn(1, D, generator=g).to(dtype).to(DEV)
    w = (torch.randn(2 * I, D, generator=g) / D ** 0.5).to(dtype).to(DEV)
    got = gate_up_gemv(x, w, config)
    assert got.shape == (1, I) and got.dtype == dtype
    assert torch.allclose(got.float(), gate_up_gemv_ref(x, w).float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match=r"w \[2I, D\]"):
        gate_up_gemv(x, w[:, :8])
    assert not dense_applies(x.cpu(), w.cpu())


@needs_gpu
def test_cuda_gated_mlp_one_row_takes_gate_up_gemv():
    from moelab.layers.mlp import GatedMLP

    torch.manual_seed(0)
    mlp = GatedMLP(512, 1408).to(DEV, torch.bfloat16)
    mlp.fuse_gate_up()
    x = torch.randn(1, 512, device=DEV, dtype=torch.bfloat16)
    assert dense_applies(x, mlp.gate_up_weight)
    got = mlp(x)
    set_enabled(True, dense=False)
    try:
        want = mlp(x)
    finally:
        set_enabled(True, dense=True)
    assert (got.float() - want.float()).norm() / want.float().norm() < 1e-2


@needs_gpu
def test_cuda_dispatch_falls_back_where_the_gemvs_do_not_apply():
    """fused_moe at one token: weights with a non-unit last stride, or an explicit tile config (tuning, benches),
    run the tensor-core GEMMs; one-row dense MLPs leave gate_up_gemv when the GEMVs are off or autograd records."""
    from moelab.kernels import gemv
    from moelab.kernels.fused_moe import config_for

    x, ids, wts, w13, w2 = _inputs(64, 8, 2048, 1024, torch.bfloat16, seed=9)
    w2t = w2.transpose(1, 2).contiguous().transpose(1, 2)
    assert applies(x, w13, None, w2) and not applies(x, w13, None, w2t)
    want = fused_moe_ref(x, ids, wts, w13, w2).float()
    got = fused_moe(x, ids, wts, w13, w2t).float()
    assert (got - want).norm() / want.norm() < 1e-2
    cfg = config_for(x, 8, w13)
    set_enabled(False)
    try:
        tc = fused_moe(x, ids, wts, w13, w2, config=cfg)
    finally:
        set_enabled(True)
    assert torch.equal(fused_moe(x, ids, wts, w13, w2, config=cfg), tc)
    w = torch.randn(2 * 704, 2048, device=DEV, dtype=torch.bfloat16)
    assert dense_applies(x, w)
    gemv.set_enabled(False)
    try:
        assert not dense_applies(x, w)
    finally:
        gemv.set_enabled(True)
    assert not dense_applies(x, w.clone().requires_grad_())
