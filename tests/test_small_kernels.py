"""RMSNorm and rotary Triton kernels against their references (under the interpreter on the CPU)."""

from __future__ import annotations

import pytest
import torch
from conftest import needs_gpu

from moelab.kernels.rms_norm import rms_norm, rms_norm_ref
from moelab.kernels.rotary import rotary, rotary_ref


@pytest.mark.parametrize("shape", [(1, 64), (7, 48), (3, 5, 16)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_rms_norm(shape, dtype) -> None:
    x = torch.randn(shape, dtype=dtype) * 3
    w = torch.rand(shape[-1], dtype=dtype) + 0.5
    got, want = rms_norm(x, w, 1e-6), rms_norm_ref(x, w, 1e-6)
    assert got.dtype == dtype and got.shape == x.shape
    assert torch.allclose(got.float(), want.float(), atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("T,Hq,Hk,rot", [(1, 4, 4, 16), (5, 6, 2, 8), (3, 20, 1, 32)])
def test_rotary(interleaved, T, Hq, Hk, rot) -> None:
    P = 64
    inv = 1.0 / 10000 ** (torch.arange(0, rot, 2).float() / rot)
    f = torch.arange(P).float()[:, None] * inv
    cos, sin = f.cos() * 1.1, f.sin() * 1.1
    q = torch.randn(T, Hq, 2 * rot)[..., :rot]  # strided view: heads not contiguous with tokens
    k = torch.randn(T, Hk, rot)
    pos = torch.randint(0, P, (T,))
    gq, gk = rotary(q, k, pos, cos, sin, interleaved)
    wq, wk = rotary_ref(q, k, pos, cos, sin, interleaved)
    assert torch.allclose(gq, wq, atol=1e-5) and torch.allclose(gk, wk, atol=1e-5)


@pytest.mark.parametrize("scoring,renorm,scale", [("softmax", False, 1.0), ("softmax", True, 1.0),
                                                  ("sigmoid", True, 2.5)])
@pytest.mark.parametrize("T,E,K", [(1, 8, 2), (9, 60, 4), (5, 64, 8), (3, 6, 6)])
def test_topk_router(scoring, renorm, scale, T, E, K) -> None:
    from moelab.kernels.topk_router import topk_router, topk_router_ref

    logits = torch.randn(T, E) * 2
    w, ids = topk_router(logits, K, scoring, renorm, scale)
    rw, rids = topk_router_ref(logits, K, scoring, renorm, scale)
    assert torch.equal(ids, rids) and torch.allclose(w, rw, atol=1e-6)


@pytest.mark.parametrize("has_v", [True, False])
def test_store_kv(has_v) -> None:
    from moelab.kernels.store_kv import store_kv, store_kv_ref

    T, S, W, Wv = 5, 32, 24, 16
    k, v = torch.randn(T, W), torch.randn(T, Wv) if has_v else None
    slots = torch.randperm(S)[:T]
    caches = [torch.randn(S, W), torch.randn(S, Wv) if has_v else None]
    want = [c.clone() if c is not None else None for c in caches]
    store_kv(k, v, caches[0], caches[1], slots)
    store_kv_ref(k, v, want[0], want[1], slots)
    assert torch.equal(caches[0], want[0]) and (not has_v or torch.equal(caches[1], want[1]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_add_rms_norm(dtype) -> None:
    from moelab.kernels.rms_norm import add_rms_norm, add_rms_norm_ref

    x, r = torch.randn(5, 40, dtype=dtype), torch.randn(5, 40, dtype=dtype)
    w = torch.rand(40, dtype=dtype) + 0.5
    (y, s), (wy, ws) = add_rms_norm(x, r, w, 1e-5), add_rms_norm_ref(x, r, w, 1e-5)
    assert torch.equal(s, ws)
    assert torch.allclose(y.float(), wy.float(), atol=1e-5 if dtype == torch.float32 else 2e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("rows,top_k,dim", [(1, 8, 64), (5, 6, 40), (3, 2, 700)])
def test_add_rms_norm_with_the_moe_top_k_sum(dtype, rows, top_k, dim) -> None:
    """The top-k sum inside the norm equals moe_sum then add_rms_norm bit for bit (same float32 sum in row
    order, rounded to the dtype before the residual add), and the torch twin agrees within rounding."""
    from moelab.kernels.moe_sum import moe_sum
    from moelab.kernels.rms_norm import add_rms_norm, add_rms_norm_ref

    y, r = torch.randn(rows * top_k, dim, dtype=dtype), torch.randn(rows, dim, dtype=dtype)
    w = torch.rand(dim, dtype=dtype) + 0.5
    fused = add_rms_norm(y, r, w, 1e-6, top_k=top_k)
    two = add_rms_norm(moe_sum(y, top_k), r, w, 1e-6)
    ref = add_rms_norm_ref(y, r, w, 1e-6, top_k=top_k)
    assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1])
    early = add_rms_norm(y, r, w, 1e-6, top_k=top_k, residual_settled=True)  # residual read before the wait
    assert torch.equal(early[0], two[0]) and torch.equal(early[1], two[1])
    e, g = torch.randn(rows, dim, dtype=dtype), torch.randn(rows, 1, dtype=dtype)
    for k, rr, kw in ((top_k, r, dict(extra=e)), (top_k, r, dict(extra=e, extra_gate=g)), (1, r, {}),
                      (top_k, torch.randn(dim, rows, dtype=dtype).T, dict(extra=e))):  # a strided residual: copied
        xx = y if k == top_k else y[:rows]
        early = add_rms_norm(xx, rr, w, 1e-6, top_k=k, residual_settled=True, **kw)
        late = add_rms_norm(xx, rr, w, 1e-6, top_k=k, **kw)
        assert torch.equal(early[0], late[0]) and torch.equal(early[1], late[1])
    tol = 1e-5 if dtype == torch.float32 else 2e-3  # torch's sum over k may add in another order
    assert torch.allclose(fused[1].float(), ref[1].float(), atol=tol)
    assert torch.allclose(fused[0].float(), ref[0].float(), atol=tol)
    with pytest.raises(ValueError, match="rows \\* top_k"):
        add_rms_norm(y[:-1], r, w, 1e-6, top_k=top_k)
    e = torch.randn(rows, dim, dtype=dtype)  # a shared expert's output: (sum + e) + residual
    fused = add_rms_norm(y, r, w, 1e-6, top_k=top_k, extra=e)
    two = add_rms_norm(moe_sum(y, top_k) + e, r, w, 1e-6)
    assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1])
    x1 = y[:rows]  # top_k 1 with an extra addend (a single routed expert plus a shared one)
    fused, two = add_rms_norm(x1, r, w, 1e-6, extra=e), add_rms_norm(x1 + e, r, w, 1e-6)
    assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1])
    with pytest.raises(ValueError, match="top_k must be >= 1"):
        add_rms_norm(y, r, w, 1e-6, top_k=0)
    from moelab.kernels.activation import add_gated

    g = torch.randn(rows, 1, dtype=dtype) * 2  # Qwen2-MoE: (sum + sigmoid(g) * e) + residual, as add_gated rounds
    fused = add_rms_norm(y, r, w, 1e-6, top_k=top_k, extra=e, extra_gate=g)
    two = add_rms_norm(add_gated(moe_sum(y, top_k), e, g), r, w, 1e-6)
    assert torch.equal(fused[0], two[0]) and torch.equal(fused[1], two[1])
    ref = add_rms_norm_ref(y, r, w, 1e-6, top_k=top_k, extra=e, extra_gate=g)
    assert torch.allclose(fused[1].float(), ref[1].float(), atol=tol) and not torch.equal(
        fused[1], add_rms_norm(y, r, w, 1e-6, top_k=top_k, extra=e)[1])  # the gate does scale e
    with pytest.raises(ValueError, match="extra_gate must be"):
        add_rms_norm(y, r, w, 1e-6, top_k=top_k, extra_gate=g)


@pytest.mark.parametrize("scoring,renorm,scale", [("softmax", False, 1.0), ("sigmoid", True, 2.5)])
@pytest.mark.parametrize("T,E,K,D", [(1, 8, 2, 48), (20, 60, 4, 40), (5, 64, 8, 16), (1, 16, 4, 700),
                                     (20, 64, 6, 300), (3, 60, 4, 700)])
def test_router_gemm_topk(scoring, renorm, scale, T, E, K, D) -> None:
    """The router GEMM inside the top-k kernel: same experts and weights as logits = x W^T then topk_router_ref;
    D not a multiple of the kernel's step, T over one 16-row block, D split over programs (D=700: 6 splits, D=300:
    3) whose partial logits the last one to arrive sums; a second call gives the same (the counters reset)."""
    from moelab.kernels.topk_router import router_topk, topk_router_ref

    x, w = torch.randn(T, D), torch.randn(E, D) * (1.5 / D ** 0.5)  # logits ~ N(0, 1.5^2): no saturated ties
    gw, gids = router_topk(x, w, K, scoring, renorm, scale)
    rw, rids = topk_router_ref(x @ w.T, K, scoring, renorm, scale)
    assert gw.shape == (T, K) and gids.dtype == torch.int64
    assert torch.equal(gids, rids) and torch.allclose(gw, rw, atol=1e-5)
    gw2, gids2 = router_topk(x, w, K, scoring, renorm, scale)
    assert torch.equal(gids2, gids) and torch.equal(gw2, gw)
    with pytest.raises(ValueError, match="router weight"):
        router_topk(x, w[:, :-1], K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("scoring,renorm,scale", [("softmax", False, 1.0), ("sigmoid", True, 2.5)])
@pytest.mark.parametrize("E,K,D", [(8, 2, 48), (60, 4, 700), (64, 8, 300)])
def test_add_norm_router_topk_is_the_two_kernels(dtype, scoring, renorm, scale, E, K, D) -> None:
    """One row: the post-attention add_rms_norm folded into the router kernel gives add_rms_norm's two outputs
    and router_topk's routing of its normed row, bit for bit, D over one and several splits."""
    from moelab.kernels.rms_norm import add_rms_norm
    from moelab.kernels.topk_router import add_norm_router_topk, router_topk

    g = torch.Generator().manual_seed(D)
    x, r = torch.randn(1, D, generator=g).to(dtype), torch.randn(1, D, generator=g).to(dtype)
    nw = (torch.rand(D, generator=g) + 0.5).to(dtype)
    w = (torch.randn(E, D, generator=g) * (1.5 / D ** 0.5)).to(dtype)
    y, summed, gw, gids = add_norm_router_topk(x, r, nw, 1e-6, w, K, scoring, renorm, scale)
    y2, summed2 = add_rms_norm(x, r, nw, 1e-6)
    gw2, gids2 = router_topk(y2, w, K, scoring, renorm, scale)
    assert torch.equal(summed, summed2) and torch.equal(y, y2)
    assert torch.equal(gids, gids2) and torch.equal(gw, gw2)
    # the residual and norm weight read before the PDL wait: the same bits
    y3, summed3, gw3, gids3 = add_norm_router_topk(x, r, nw, 1e-6, w, K, scoring, renorm, scale,
                                                   residual_settled=True)
    assert torch.equal(summed3, summed2) and torch.equal(y3, y2)
    assert torch.equal(gids3, gids2) and torch.equal(gw3, gw2)
    with pytest.raises(ValueError, match="one row"):
        add_norm_router_topk(torch.cat([x, x]), torch.cat([r, r]), nw, 1e-6, w, K)
    with pytest.raises(ValueError, match="norm weight"):
        add_norm_router_topk(x, r, nw[:-1], 1e-6, w, K)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("norm", [None, "full", "per_head"])
@pytest.mark.parametrize("H,KV,hd,interleaved", [(4, 4, 16, False), (6, 2, 8, True), (3, 1, 32, False)])
def test_qk_rope_store(norm, H, KV, hd, interleaved, dtype) -> None:
    """q/k norm + RoPE + KV store in one kernel equals rms_norm_ref, rotary_ref and store_kv_ref in sequence,
    for H not a power of two, GQA/MQA and both rotary layouts; nothing but the mapped cache slots changes."""
    from moelab.kernels.qk_rope_store import qk_rope_store, qk_rope_store_ref

    T, P, S = 5, 64, 24
    qkv = (torch.randn(T, (H + 2 * KV) * hd) * 2).to(dtype)
    inv = 1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd)
    f = torch.arange(P).float()[:, None] * inv
    cos, sin = f.cos().contiguous(), f.sin().contiguous()
    qw = kw = None
    if norm == "full":
        qw, kw = (torch.rand(H * hd) + 0.5).to(dtype), (torch.rand(KV * hd) + 0.5).to(dtype)
    elif norm == "per_head":
        qw, kw = (torch.rand(hd) + 0.5).to(dtype), (torch.rand(hd) + 0.5).to(dtype)
    pos = torch.randint(0, P, (T,))
    slots = torch.randperm(S)[:T]
    caches = [torch.randn(S, KV * hd).to(dtype), torch.randn(S, KV * hd).to(dtype)]
    want_c = [c.clone() for c in caches]
    got = qk_rope_store(qkv, H, KV, pos, cos, sin, caches[0], caches[1], slots, norm, qw, kw, 1e-6, interleaved)
    want = qk_rope_store_ref(qkv, H, KV, pos, cos, sin, want_c[0], want_c[1], slots, norm, qw, kw, 1e-6,
                             interleaved)
    tol = 1e-5 if dtype == torch.float32 else 4e-3  # fp16: a last-place difference after a rounded norm
    assert got.shape == (T, H, hd) and got.dtype == dtype
    assert torch.allclose(got.float(), want.float(), atol=tol, rtol=tol)
    assert torch.allclose(caches[0].float(), want_c[0].float(), atol=tol, rtol=tol)
    assert torch.equal(caches[1], want_c[1])
    from moelab.kernels.pdl import set_early_reads

    set_early_reads(False)  # the norm weights read after the PDL wait instead of before: the same bits
    try:
        late_c = [c.clone() for c in caches]
        late = qk_rope_store(qkv, H, KV, pos, cos, sin, late_c[0], late_c[1], slots, norm, qw, kw, 1e-6, interleaved)
    finally:
        set_early_reads(True)
    assert torch.equal(late, got) and torch.equal(late_c[0], caches[0])
    with pytest.raises(ValueError, match="q/k norm"):
        qk_rope_store(qkv, H, KV, pos, cos, sin, caches[0], caches[1], slots, "full", None, None)


@pytest.mark.parametrize("T,I", [(1, 16), (5, 1100)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_silu_mul_and_add_gated(T, I, dtype) -> None:
    """The MLP tails in one kernel each equal the eager expressions (rounded where eager rounds; half precisions
    up to one last-place difference of exp)."""
    from moelab.kernels.activation import add_gated, add_gated_ref, silu_mul, silu_mul_ref

    gu = (torch.randn(T, 2 * I) * 3).to(dtype)
    tol = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 2e-2}[dtype]  # bf16: up to 2 last-place units
    assert torch.allclose(silu_mul(gu).float(), silu_mul_ref(gu).float(), atol=tol, rtol=tol)
    r, s, g = (torch.randn(T, I) * 2).to(dtype), torch.randn(T, I).to(dtype), torch.randn(T, 1).to(dtype)
    assert torch.allclose(add_gated(r, s, g).float(), add_gated_ref(r, s, g).float(), atol=tol, rtol=tol)
    with pytest.raises(ValueError, match="even number"):
        silu_mul(gu[:, 1:].contiguous())
    with pytest.raises(ValueError, match="gate"):
        add_gated(r, s, g[:, 0])


def test_pdl_launch_options_off_the_gpu() -> None:
    """Programmatic dependent launch only where it exists: on the CPU (the interpreter) the kernels get
    USE_PDL=False and no launch_pdl keyword; set_enabled(False) turns it off everywhere."""
    from moelab.kernels import pdl

    assert pdl.launch_options(torch.device("cpu")) == {"USE_PDL": False}
    assert not pdl.use_pdl(torch.device("cpu"))
    try:
        pdl.set_enabled(False)
        assert not pdl._ENABLED
    finally:
        pdl.set_enabled(True)


@needs_gpu
@pytest.mark.parametrize("E,K,D", [(64, 8, 2048), (128, 8, 2048), (60, 4, 2048), (64, 6, 2048)])
def test_add_norm_router_topk_cuda(E, K, D) -> None:
    """Compiled, bf16, at the router shapes the decoder folds (D <= 2048: OLMoE, Qwen3, DeepSeek-V2-Lite; E=60
    top-4 stands for any other): the folded norm + router gives the two kernels' bits."""
    from moelab.kernels.rms_norm import add_rms_norm
    from moelab.kernels.topk_router import add_norm_router_topk, router_topk

    x, r = torch.randn(1, D, device="cuda", dtype=torch.bfloat16), torch.randn(1, D, device="cuda",
                                                                             dtype=torch.bfloat16)
    nw = torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5
    w = torch.randn(E, D, device="cuda", dtype=torch.bfloat16) * (1.5 / D ** 0.5)
    from moelab.kernels import rms_norm

    rms_norm.set_one_row_warps(4)  # the router kernel's launch shape: its RMS sums in the same order
    try:
        y2, summed2 = add_rms_norm(x, r, nw, 1e-6)
        y3, summed3 = add_rms_norm(x, r, nw, 1e-6, residual_settled=True)
    finally:
        rms_norm.set_one_row_warps(None)
    gw2, gids2 = router_topk(y2, w, K, "softmax", True)
    for settled in (False, True):  # the residual read after / before the PDL wait
        y, summed, gw, gids = add_norm_router_topk(x, r, nw, 1e-6, w, K, "softmax", True, residual_settled=settled)
        assert torch.equal(summed, summed2) and torch.equal(y, y2)
        assert torch.equal(gids, gids2) and torch.equal(gw, gw2)
    assert torch.equal(summed3, summed2) and torch.equal(y3, y2)
    y16, summed16 = add_rms_norm(x, r, nw, 1e-6)  # the default one-row shape (16 warps): another summation order
    assert torch.equal(summed16, summed2)
    torch.testing.assert_close(y16, y2, atol=0, rtol=2 ** -7)  # at most a bf16 rounding apart


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("T,E,K,D,scoring,renorm,scale", [
    (1, 60, 4, 700, "softmax", False, 1.0), (5, 60, 4, 96, "sigmoid", True, 2.5), (3, 63, 2, 300, "softmax", True, 1.0),
    (40, 60, 4, 128, "softmax", False, 1.0),  # several 16-row blocks
])
def test_router_with_an_extra_row(dtype, T, E, K, D, scoring, renorm, scale) -> None:
    """A weight with one more row than experts (Qwen2-MoE's shared gate): the routing is the experts' alone, bit for
    bit, and the extra row's logits come back in x's dtype (E + 1 = 64 fills the block exactly)."""
    from moelab.kernels.topk_router import add_norm_router_topk, router_topk

    g = torch.Generator().manual_seed(T * E + D)
    x = torch.randn(T, D, generator=g).to(dtype)
    rows = (torch.randn(E + 1, D, generator=g) * (1.5 / D ** 0.5)).to(dtype)
    rows[E] *= 50  # a large extra logit must still never be picked
    w, ids, xo = router_topk(x, rows, K, scoring, renorm, scale, extra_row=True)
    w2, ids2 = router_topk(x, rows[:E].contiguous(), K, scoring, renorm, scale)
    assert int(ids.max()) < E
    assert torch.equal(w, w2) and torch.equal(ids, ids2)
    assert xo.shape == (T, 1) and xo.dtype == dtype
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(xo.float(), (x.float() @ rows[E:].float().T), atol=tol, rtol=tol)
    if T == 1:
        r, nw = torch.randn(1, D, generator=g).to(dtype), (torch.rand(D, generator=g) + 0.5).to(dtype)
        five = add_norm_router_topk(x, r, nw, 1e-6, rows, K, extra_row=True)
        four = add_norm_router_topk(x, r, nw, 1e-6, rows[:E].contiguous(), K)
        assert len(five) == 5 and all(torch.equal(a, b) for a, b in zip(five[:4], four))
        torch.testing.assert_close(five[4].float(), five[0].float() @ rows[E:].float().T, atol=tol, rtol=tol)


@needs_gpu
@pytest.mark.parametrize("T", [1, 64])
def test_router_with_an_extra_row_cuda(T: int) -> None:
    """Compiled, bf16, Qwen1.5-MoE's router (60 experts + the shared gate, D=2048): the experts' routing bit for bit,
    the gate's logits within a bf16 rounding of the separate GEMV's."""
    from moelab.kernels.topk_router import add_norm_router_topk, router_topk
    from moelab.layers.linear import linear

    x = torch.randn(T, 2048, device="cuda", dtype=torch.bfloat16)
    rows = torch.randn(61, 2048, device="cuda", dtype=torch.bfloat16) * (1.5 / 2048 ** 0.5)
    w, ids, xo = router_topk(x, rows, 4, extra_row=True)
    w2, ids2 = router_topk(x, rows[:60].contiguous(), 4)
    assert torch.equal(w, w2) and torch.equal(ids, ids2)
    torch.testing.assert_close(xo.float(), linear(x, rows[60:]).float(), atol=2e-2, rtol=1e-2)
    if T == 1:
        r, nw = torch.randn_like(x), torch.rand(2048, device="cuda", dtype=torch.bfloat16) + 0.5
        five = add_norm_router_topk(x, r, nw, 1e-6, rows, 4, residual_settled=True, extra_row=True)
        four = add_norm_router_topk(x, r, nw, 1e-6, rows[:60].contiguous(), 4, residual_settled=True)
        assert all(torch.equal(a, b) for a, b in zip(five[:4], four))
        torch.testing.assert_close(five[4].float(), linear(five[0], rows[60:]).float(), atol=2e-2, rtol=1e-2)


def test_launch_shape_switches_of_the_one_row_kernels() -> None:
    """The sweep switches (norm / RoPE warps, the router's splits and warps) leave the results right and refuse what
    the kernels cannot launch."""
    from moelab.kernels import qk_rope_store as qr
    from moelab.kernels import rms_norm, topk_router

    g = torch.Generator().manual_seed(7)
    x, w = torch.randn(1, 700, generator=g), torch.randn(60, 700, generator=g) * 0.05
    want = topk_router.topk_router_ref(x @ w.T, 4)
    for splits, warps in ((8, 2), (4, 8), (1, 4)):
        topk_router.set_split_shape(splits, warps)
        try:
            got = topk_router.router_topk(x, w, 4)
        finally:
            topk_router.set_split_shape()
        assert torch.equal(got[1], want[1])
        torch.testing.assert_close(got[0], want[0], atol=1e-5, rtol=1e-5)
    r, nw = torch.randn(1, 700, generator=g), torch.rand(700, generator=g) + 0.5
    base = rms_norm.add_rms_norm(x, r, nw, 1e-6)
    assert rms_norm._warps(2048, 1) == 16 and rms_norm._warps(1024, 1) == 4 and rms_norm._warps(2048, 2) == 4
    H, KV, hd, T = 4, 2, 16, 3  # (the interpreter ignores warps: these check the launches and their results)
    qkv = torch.randn(T, (H + 2 * KV) * hd, generator=g)
    f = torch.arange(8).float()[:, None] * (1.0 / 10000 ** (torch.arange(0, hd, 2).float() / hd))
    rope = (torch.tensor([1, 5, 7]), f.cos().contiguous(), f.sin().contiguous())
    want_q = qr.qk_rope_store_ref(qkv, H, KV, *rope, torch.zeros(8, KV * hd), torch.zeros(8, KV * hd),
                                  torch.tensor([0, 2, 4]), None, None, None)
    rms_norm.set_one_row_warps(8)
    qr.set_num_warps(2)
    try:
        assert rms_norm._warps(2048, 1) == 8 and rms_norm._warps(512, 1) == 8
        assert all(torch.equal(a, b) for a, b in zip(rms_norm.add_rms_norm(x, r, nw, 1e-6), base))
        got_q = qr.qk_rope_store(qkv, H, KV, *rope, torch.zeros(8, KV * hd), torch.zeros(8, KV * hd),
                                 torch.tensor([0, 2, 4]), None, None, None)
        torch.testing.assert_close(got_q, want_q, atol=1e-5, rtol=1e-5)
    finally:
        rms_norm.set_one_row_warps(None)
        qr.set_num_warps(4)
    for bad in (lambda: topk_router.set_split_shape(17, 4), lambda: topk_router.set_split_shape(8, 3),
                lambda: rms_norm.set_one_row_warps(3), lambda: qr.set_num_warps(64)):
        with pytest.raises(ValueError):
            bad()
