"""Kernel-name classification of the lab's profile breakdown (what CUDA-graph decode replays are attributed by)."""

from __future__ import annotations

import pytest

from moelab.lab.profile import CATEGORIES, classify_kernel


@pytest.mark.parametrize("name,category", [
    ("_gate_up_kernel", "expert_gemm"),            # moelab's fused MoE
    ("_down_kernel", "expert_gemm"),
    ("fused_moe_kernel", "expert_gemm"),           # vLLM's
    ("_gemv_kernel", "dense_gemm"),                # moelab's one-row projections
    ("nvjet_tst_128x64_64x4_1x2_h_bz_coopA_NNT", "dense_gemm"),
    ("_router_gemm_topk_kernel", "routing"),       # the router GEMM inside the top-k kernel
    ("_paged_attention_kernel", "attention"),
    ("ncclDevKernel_AllReduce_Sum_bf16_RING_LL", "communication"),
    ("void at::native::reduce_kernel<512, 1, ArgMaxOps<float>>", "sampling"),
    ("_rms_norm_kernel", "other"),
])
def test_classify_kernel(name: str, category: str) -> None:
    assert category in CATEGORIES
    assert classify_kernel(name) == category
