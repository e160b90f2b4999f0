"""Tiny random configs of every family, written as real checkpoints; seeds."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import torch

# The tests build CPU tensors and run the Triton kernels under the interpreter, on any machine (the engine's "auto"
# device is then the CPU: moelab/device.py). A GPU run compiles them instead: MOELAB_TEST_GPU=1 on a machine with
# CUDA, for the tests marked with `needs_gpu` and the kernel tests that place their tensors on `DEV`:
#   MOELAB_TEST_GPU=1 python -m pytest -q tests -k "cuda or never_waits"
#   MOELAB_TEST_GPU=1 python -m pytest -q tests/test_moe_quant.py tests/test_fused_moe.py tests/test_gemv.py
# The variable is read when a kernel module is imported, so it is set here, before any test module imports one.
if not (torch.cuda.is_available() and os.environ.get("MOELAB_TEST_GPU") == "1"):
    os.environ.setdefault("TRITON_INTERPRET", "1")

from moelab.checkpoint.synthetic import synthetic_config, write_checkpoint

DEV = "cuda" if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1" else "cpu"
needs_gpu = pytest.mark.skipif(DEV != "cuda", reason="compiled CUDA kernels: MOELAB_TEST_GPU=1 on a CUDA machine")

SMALL = dict(layers=2, hidden_size=64, heads=4, kv_heads=4, experts=8, top_k=2, moe_intermediate_size=32,
             vocab_size=320)

# name -> (preset, shape overrides, extra HF config keys). Together they cover GQA, shared experts,
# norm_topk_prob both ways, top-k > 1 with E not a power of two, dense first layers, MLA with and
# without q LoRA, both DeepSeek group-limited routings, and QKV clipping.
TINY: dict[str, tuple[str, dict[str, Any], dict[str, Any]]] = {
    "mixtral-gqa": ("mixtral-8x7b", dict(SMALL, kv_heads=2), {}),
    "olmoe": ("olmoe-1b-7b", SMALL, {}),
    "olmoe-norm-clip": ("olmoe-1b-7b", dict(SMALL, experts=6, top_k=3), {"norm_topk_prob": True, "clip_qkv": 0.05}),
    "qwen2-moe-shared-e6": ("qwen1.5-moe-a2.7b", dict(SMALL, experts=6, top_k=3),
                            {"shared_expert_intermediate_size": 48, "intermediate_size": 96}),
    "qwen2-moe-dense-first": ("qwen2-57b-a14b", dict(SMALL, kv_heads=2, layers=3),
                              {"shared_expert_intermediate_size": 48, "intermediate_size": 96,
                               "mlp_only_layers": [0]}),
    "qwen3-moe-gqa-norm": ("qwen3-30b-a3b", dict(SMALL, kv_heads=2), {"head_dim": 16}),
    "qwen3-moe-nonorm-e12": ("qwen3-30b-a3b", dict(SMALL, experts=12, top_k=3, kv_heads=1),
                             {"head_dim": 16, "norm_topk_prob": False}),
    "deepseek-v2-lite": ("deepseek-v2-lite", dict(SMALL, layers=3),
                         {"intermediate_size": 96, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                          "qk_nope_head_dim": 16, "v_head_dim": 16}),
    "deepseek-v2-group": ("deepseek-v2", dict(SMALL, experts=12, top_k=3, layers=3, n_group=4, topk_group=2),
                          {"intermediate_size": 96, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                           "qk_nope_head_dim": 16, "v_head_dim": 16, "routed_scaling_factor": 2.0}),
    "deepseek-v3": ("deepseek-v3", dict(SMALL, experts=16, top_k=4, layers=3, n_group=4, topk_group=2),
                    {"intermediate_size": 96, "q_lora_rank": 24, "kv_lora_rank": 32, "qk_rope_head_dim": 8,
                     "qk_nope_head_dim": 16, "v_head_dim": 16, "first_k_dense_replace": 1}),
}


def tiny_config(name: str) -> dict[str, Any]:
    preset, overrides, extra = TINY[name]
    cfg = synthetic_config(preset, dtype="float32", **overrides)
    cfg.update(extra)
    return cfg


def write_tiny(name: str, out: Path, seed: int = 0, max_shard_bytes: int = 1 << 18) -> Path:
    write_checkpoint(tiny_config(name), out, seed=seed, dtype="float32", max_shard_bytes=max_shard_bytes)
    return out


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny")
    return {name: write_tiny(name, root / name) for name in TINY}


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
