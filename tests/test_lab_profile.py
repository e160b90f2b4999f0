"""The lab's profile breakdown: kernel-name classification (what CUDA-graph decode replays are attributed by), the
attribution of kernels launched inside moelab ranges, and the ranges put around every family's MoE blocks."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from moelab.lab.profile import _Ranges, breakdown, classify_kernel

# every Triton kernel moelab launches, with the category its time belongs to; a new kernel must be added here
MOELAB_KERNELS = {
    "_paged_attention_kernel": "attention", "_split_reduce_kernel": "attention", "_qk_rope_store_kernel": "attention",
    "_store_kv_kernel": "attention", "_rotary_kernel": "attention",
    "_mla_prep_kernel": "attention", "_mla_uv_kernel": "attention",  # MLA's one-token steps around attention
    "_gate_up_kernel": "expert_gemm", "_down_kernel": "expert_gemm", "_sum_kernel": "expert_gemm",
    "_per_token_quant_kernel": "expert_gemm", "_silu_mul_kernel": "expert_gemm", "_add_gated_kernel": "expert_gemm",
    "_topk_router_kernel": "routing", "_router_gemm_topk_kernel": "routing", "_count_kernel": "routing",
    "_place_kernel": "routing",
    "_gemv_kernel": "dense_gemm",
    "_rms_norm_kernel": "other", "_add_rms_norm_kernel": "other",  # the residual adds (and deferred top-k sums)
    "_argmax_kernel": "sampling",
    "_feed_inputs_kernel": "other",  # a decode graph's input fix-up
    "_moe_gate_up_gemv_kernel": "expert_gemm", "_moe_down_gemv_kernel": "expert_gemm",
}


def launched_kernels() -> set[str]:
    root = Path(__file__).parent.parent / "moelab"
    return {m for f in root.rglob("*.py") for m in re.findall(r"\b(_[a-z0-9_]+_kernel)\[\(", f.read_text())}


def test_every_moelab_kernel_has_its_category():
    found = launched_kernels()
    assert "_gemv_kernel" in found and "_gate_up_kernel" in found  # the scan finds launches
    assert found == set(MOELAB_KERNELS), f"classify these kernels in MOELAB_KERNELS: {found ^ set(MOELAB_KERNELS)}"
    wrong = {k: classify_kernel(k) for k, want in MOELAB_KERNELS.items() if classify_kernel(k) != want}
    assert not wrong


@pytest.mark.parametrize("name,category", [
    ("fused_moe_kernel", "expert_gemm"),           # vLLM's
    ("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT", "dense_gemm"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("void at::native::reduce_kernel<512, 1, ArgMaxOps<float>>", "sampling"),
    ("void at::native::vectorized_elementwise_kernel<4, CUDAFunctor_add<float>>", "other"),
])
def test_classify_other_kernels(name: str, category: str) -> None:
    assert classify_kernel(name) == category


def _ev(id_: int, name: str, device: str, parent=None, dur_us: float = 0.0, corr: int = 0, self_us: float = 0.0):
    return SimpleNamespace(id=id_, name=name, device_type=SimpleNamespace(name=device), cpu_parent=parent,
                           time_range=SimpleNamespace(start=0.0, end=dur_us), linked_correlation_id=corr,
                           self_cpu_time_total=self_us)


def test_kernels_launched_directly_inside_a_range_take_its_category():
    """A Triton kernel has no aten operator around it: its launching event is the moelab range itself."""
    model = _ev(1, "moelab.model", "CPU")
    attn = _ev(2, "moelab.attention", "CPU", parent=model)
    moe = _ev(3, "moelab.moe", "CPU", parent=model)
    experts = _ev(4, "moelab.expert_gemm", "CPU", parent=moe)
    mm = _ev(5, "aten::mm", "CPU", parent=attn)
    events = [model, attn, moe, experts, mm,
              _ev(10, "_paged_attention_kernel", "CUDA", dur_us=3.0, corr=2),
              _ev(11, "_gate_up_kernel", "CUDA", dur_us=5.0, corr=4),
              _ev(12, "nvjet_gemm", "CUDA", dur_us=7.0, corr=5),      # cuBLAS under an aten op in attention
              _ev(13, "_rms_norm_kernel", "CUDA", dur_us=11.0, corr=1),
              _ev(14, "_gemv_kernel", "CUDA", dur_us=13.0, corr=0)]  # a graph replay: by name
    cuda = breakdown(events)["cuda"]
    assert cuda["attention"] == pytest.approx((3.0 + 7.0) / 1e6)
    assert cuda["expert_gemm"] == pytest.approx(5.0 / 1e6)
    assert cuda["other"] == pytest.approx(11.0 / 1e6)
    assert cuda["dense_gemm"] == pytest.approx(13.0 / 1e6)


@pytest.mark.parametrize("name", ["olmoe", "qwen2-moe-shared-e6", "deepseek-v2-lite"])
def test_ranges_wrap_every_family_moe_block(name, tiny_checkpoints):
    """SparseMoE subclasses (Qwen2-MoE's and DeepSeek's blocks) get their expert and routing ranges too."""
    from moelab.llm import LLM

    model = LLM(str(tiny_checkpoints[name]), max_model_len=32, block_size=4).engine.model
    blocks = [m for m in model.modules() if any(c.__name__ == "SparseMoE" for c in type(m).__mro__)]
    assert blocks
    backends = [b.backend for b in blocks]
    ranges = _Ranges(model)
    try:  # each block's expert call and routing now run inside wrappers (the moelab ranges)
        assert all(b.backend is not f and "route" in vars(b) for b, f in zip(blocks, backends))
    finally:
        ranges.remove()
    assert all(b.backend is f and "route" not in vars(b) for b, f in zip(blocks, backends))  # undone


def test_one_row_routing_with_the_folded_norm_stays_in_the_routing_range(tiny_checkpoints):
    """At one row the fast path computes the post-attention norm and the routing in one kernel, through the MoE
    block's add_norm_route: the profile's routing range wraps that as it wraps route, once per MoE layer."""
    import torch

    from moelab.context import ForwardContext, forward_context
    from moelab.models.loader import load_model

    model = load_model(tiny_checkpoints["olmoe"], moe_backend="triton")
    model.prepare_fast_path(64)
    n_moe = sum(1 for m in model.modules() if any(c.__name__ == "SparseMoE" for c in type(m).__mro__))
    ranges = _Ranges(model)
    try:
        with torch.no_grad(), forward_context(ForwardContext.for_prompts([1])), torch.profiler.profile() as prof:
            model(torch.tensor([17]), torch.tensor([0]))
    finally:
        ranges.remove()
    names = [e.name for e in prof.events()]
    assert names.count("moelab.routing") == n_moe and names.count("moelab.moe") == n_moe


def test_exposed_kernel_time_under_programmatic_dependent_launch():
    """With PDL a kernel starts before the one in front ends: durations overlap. The exposed breakdown counts each
    kernel for how far it moves the latest end, so it adds up to the busy span; gaps count for no one."""
    from moelab.lab.profile import exposed_times

    assert exposed_times([(8.0, 14.0), (0.0, 10.0), (20.0, 30.0), (25.0, 28.0)]) == [4.0, 10.0, 10.0, 0.0]
    assert exposed_times([]) == []


def test_idle_before_each_kernel() -> None:
    """The gaps with no kernel running, charged to the kernel that ends them; with the exposed times they add up to
    the span from the first start to the last end."""
    from moelab.lab.profile import exposed_times, idle_before

    spans = [(8.0, 14.0), (0.0, 10.0), (20.0, 30.0), (25.0, 28.0), (31.5, 32.0)]
    assert idle_before(spans) == [0.0, 0.0, 6.0, 0.0, 1.5]
    assert sum(idle_before(spans)) + sum(exposed_times(spans)) == 32.0 - 0.0
    assert idle_before([]) == [] and idle_before([(3.0, 4.0)]) == [0.0]

    def k(id_, name, start, end):
        return SimpleNamespace(id=id_, name=name, device_type=SimpleNamespace(name="CUDA"), cpu_parent=None,
                               time_range=SimpleNamespace(start=start, end=end), linked_correlation_id=0,
                               self_cpu_time_total=0.0)

    events = [k(1, "_gemv_kernel", 0.0, 10.0), k(2, "_paged_attention_kernel", 8.0, 14.0),
              k(3, "_moe_gate_up_gemv_kernel", 20.0, 30.0), k(4, "_moe_down_gemv_kernel", 25.0, 33.0)]
    b = breakdown(events)
    assert b["cuda"]["expert_gemm"] == pytest.approx(18.0 / 1e6)  # 10 + 8, overlapping
    assert b["cuda_exposed"]["expert_gemm"] == pytest.approx(13.0 / 1e6)  # 10 + 3
    assert b["cuda_exposed"]["attention"] == pytest.approx(4.0 / 1e6)
    assert b["cuda_exposed"]["dense_gemm"] == pytest.approx(10.0 / 1e6)
    assert sum(b["cuda_exposed"].values()) == pytest.approx(27.0 / 1e6)  # the union of the spans
