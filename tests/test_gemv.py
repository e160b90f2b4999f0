"""The one-row GEMV (moelab.kernels.gemv) against its float32 twin, and the Linear layer that dispatches to it."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import triton
from conftest import DEV, needs_gpu

from moelab.kernels.gemv import GemvConfig, default_config, gemv, gemv_ref, set_enabled
from moelab.layers.linear import Linear, use_gemv

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("N,K,bias,cfg", [
    (37, 64, False, None),                           # N not a multiple of the rows per program
    (64, 300, True, None),                           # K not a power of two, bias
    (48, 5000, False, GemvConfig(4, 1024, 4)),       # five K chunks, the last one partial
    (5, 96, True, GemvConfig(8, 32, 2)),             # fewer rows than one program's block
    (1, 128, False, None),                           # a one-column output (Qwen2-MoE's shared-expert gate)
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_gemv_matches_float32_twin(N, K, bias, cfg, dtype):
    g = torch.Generator().manual_seed(N * 7 + K)
    w = torch.randn(N, K, generator=g).to(DEV, dtype)
    x = torch.randn(1, K, generator=g).to(DEV, dtype)
    b = torch.randn(N, generator=g).to(DEV, dtype) if bias else None
    y = gemv(x, w, b, cfg)
    assert y.shape == (1, N) and y.dtype == dtype
    assert rel(y, gemv_ref(x, w, b)) < TOL[dtype]


def test_gemv_takes_a_flat_row_strided_weight_rows_and_a_strided_bias():
    w_big = torch.randn(40, 160, device=DEV)
    w = w_big[:, :128]  # row stride 160, unit last stride
    x = torch.randn(128, device=DEV)
    y = gemv(x, w)
    assert y.shape == (40,)
    assert rel(y, gemv_ref(x, w)) < 1e-5
    b = torch.randn(80, device=DEV)[::2]
    assert rel(gemv(x, w, b), gemv_ref(x, w, b)) < 1e-5


def test_gemv_rejects_what_it_cannot_compute():
    w = torch.randn(16, 32, device=DEV)
    with pytest.raises(ValueError, match="one row of 32"):
        gemv(torch.randn(2, 32, device=DEV), w)
    with pytest.raises(ValueError, match="last dimension contiguous"):
        gemv(torch.randn(1, 16, device=DEV), w.T)
    with pytest.raises(ValueError, match=r"bias must be \[16\]"):
        gemv(torch.randn(1, 32, device=DEV), w, torch.randn(8, device=DEV))


def test_default_config_by_output_width():
    for N, K in ((2048, 2048), (6144, 2048), (576, 2048), (50304, 2048), (2048, 10944), (1, 2048), (3, 40)):
        c = default_config(N, K, 132)
        wide = N >= 8 * 2.5 * 132
        assert c.block_n == (8 if wide else 1 if N == 1 else 2)
        assert c.block_k == min(1024 if wide else 2048, triton.next_power_of_2(max(K, 16)))
        assert c.num_warps == (4 if wide else 8)
    assert default_config(2048, 2048, num_sms=16).block_n == 8  # the width is counted in SMs, not fixed


def test_linear_dispatch_and_equality_on_the_reference_path():
    lin = Linear(64, 24, bias=True)
    x = torch.randn(1, 64)
    assert not use_gemv(x, lin.weight)  # CPU tensors: F.linear, exactly
    assert torch.equal(lin(x), F.linear(x, lin.weight, lin.bias))
    assert set(lin.state_dict()) == {"weight", "bias"}  # checkpoint names as nn.Linear's


@needs_gpu
def test_linear_uses_the_gemv_for_one_cuda_row_only():
    lin = Linear(256, 96, bias=True).to("cuda", torch.bfloat16)
    x1, x4 = torch.randn(1, 256, device="cuda", dtype=torch.bfloat16), torch.randn(4, 256, device="cuda",
                                                                                     dtype=torch.bfloat16)
    with torch.inference_mode():
        assert use_gemv(x1, lin.weight) and not use_gemv(x4, lin.weight)
        assert rel(lin(x1), F.linear(x1, lin.weight, lin.bias)) < 1e-2
        set_enabled(False)
        try:
            assert not use_gemv(x1, lin.weight)
        finally:
            set_enabled(True)
    assert not use_gemv(x1, lin.weight)  # autograd records: the kernel has no backward


@pytest.mark.parametrize("name", ["mixtral-gqa", "qwen2-moe-dense-first", "deepseek-v2-lite"])
def test_models_give_the_same_logits_through_the_gemv(name, tiny_checkpoints, monkeypatch):
    """The wiring: a one-token forward (every projection a one-row product) with the GEMV forced on (the CUDA
    condition lifted, so it runs under the interpreter here) gives F.linear's logits, and it ran for the attention
    / MLA projections, the dense and shared MLPs, Qwen2-MoE's biased QKV and shared-expert gate, and the LM head."""
    from moelab.context import ForwardContext, forward_context
    from moelab.layers import linear as linear_mod
    from moelab.llm import LLM

    llm = LLM(str(tiny_checkpoints[name]), dtype="float32", max_model_len=64, block_size=4)
    model, spec = llm.engine.model, llm.engine.spec
    dev = next(model.parameters()).device  # the CPU, or the GPU under MOELAB_TEST_GPU=1
    ids, pos = torch.tensor([17], device=dev), torch.tensor([0], device=dev)

    def logits():
        with torch.inference_mode(), forward_context(ForwardContext.for_prompts([1], dev)):
            return model.compute_logits(model(ids, pos))

    want = logits()
    shapes = set()

    def forced(x, weight):
        ok = x.numel() == x.shape[-1] and x.dim() <= 2 and weight.dtype == x.dtype and weight.stride(1) == 1
        if ok:
            shapes.add(tuple(weight.shape))
        return ok

    monkeypatch.setattr(linear_mod, "use_gemv", forced)
    got = logits()
    assert rel(got, want) < 1e-5
    assert (spec.vocab_size, spec.hidden_size) in shapes  # the LM head
    assert (spec.hidden_size, spec.num_heads * (spec.v_head_dim if spec.kv_lora_rank else spec.head_dim)) in shapes
    if name == "qwen2-moe-dense-first":
        assert (1, spec.hidden_size) in shapes  # the shared-expert gate


def test_gemv_predicates_on_the_cpu(monkeypatch) -> None:
    """The GPU-only fast paths' predicates, every condition but the device (moelab.device.is_gpu patched): one row,
    the weight's dtype and device, unit last strides, no autograd recording, the on/off switches."""
    import moelab.device
    from moelab.kernels import gemv
    from moelab.kernels import moe_gemv as mg

    assert not use_gemv(torch.randn(1, 8), torch.randn(4, 8))  # the CPU: never
    monkeypatch.setattr(moelab.device, "is_gpu", lambda t: True)
    x, w = torch.randn(1, 8), torch.randn(4, 8)
    assert use_gemv(x, w) and use_gemv(x[0], w)
    assert not use_gemv(torch.randn(2, 8), w)  # two rows
    assert not use_gemv(x, w.double()) and not use_gemv(x, torch.randn(8, 4).T)  # dtype; last stride 2 -> 4
    assert not use_gemv(x, torch.randn(2, 4, 8))  # a 3-D weight
    wg = torch.randn(4, 8, requires_grad=True)
    assert not use_gemv(x, wg)
    with torch.no_grad():
        assert use_gemv(x, wg)
    gemv.set_enabled(False)
    try:
        assert not use_gemv(x, w)
    finally:
        gemv.set_enabled(True)
    # the MoE GEMVs: one token, x's dtype or int8_channel, unit strides everywhere
    w13, w2 = torch.randn(4, 6, 8), torch.randn(4, 8, 3)
    assert mg.applies(x, w13, None, w2) and not mg.applies(torch.randn(2, 8), w13, None, w2)
    assert not mg.applies(x, w13.half(), None, w2) and not mg.applies(x, w13, "fp8_channel", w2)
    assert mg.applies(x, w13.to(torch.int8), "int8_channel", w2.to(torch.int8), (torch.ones(4, 6), torch.ones(4, 8)))
    assert not mg.applies(x, w13.transpose(1, 2).contiguous().transpose(1, 2), None, w2)
    assert not mg.applies(x, w13, None, w2, (torch.ones(6, 4).T,))
    gu = torch.randn(6, 8)
    assert mg.dense_applies(x, gu) and not mg.dense_applies(torch.randn(2, 8), gu)
    assert not mg.dense_applies(x, gu.half()) and not mg.dense_applies(x, torch.randn(8, 6).T)
