from __future__ import annotations

import pytest

from moelab.checkpoint.layout import checkpoint_tensors
from moelab.hf_config import apply_overrides, spec_from_hf_config
from moelab.presets import PRESETS, PUBLISHED, preset_config, preset_spec


@pytest.mark.parametrize("name", PRESETS)
def test_preset_totals_match_published(name: str) -> None:
    pc = preset_spec(name).param_counts()
    pub = PUBLISHED[name]
    assert abs(pc.total / pub.total - 1) < 0.01
    active = pc.active if pub.active_convention == "with_embedding" else pc.active_without_embedding
    assert abs(active / pub.active - 1) < 0.03  # published actives are rounded to two or three digits


@pytest.mark.parametrize("name", PRESETS)
def test_checkpoint_layout_counts_every_parameter(name: str) -> None:
    spec = preset_spec(name)
    assert sum(t.numel for t in checkpoint_tensors(spec)) == spec.param_counts().total


def test_hand_computed_counts_olmoe() -> None:
    s = preset_spec("olmoe-1b-7b")
    pc = s.param_counts()
    attn = 4 * 2048 * 2048 + 2 * 2048  # q,k,v,o + q_norm/k_norm over all heads
    experts = 64 * 3 * 2048 * 1024
    layer = attn + experts + 64 * 2048 + 2 * 2048
    assert pc.total == 16 * layer + 2 * 50304 * 2048 + 2048
    assert pc.expert == 16 * experts
    assert pc.active == pc.total - 16 * experts + 16 * 8 * 3 * 2048 * 1024
    assert s.kv_bytes_per_token(2) == 16 * 2 * 16 * 128 * 2  # 128 KiB


def test_kv_bytes_mla_and_gqa() -> None:
    assert preset_spec("deepseek-v2-lite").kv_bytes_per_token(2) == 27 * (512 + 64) * 2
    assert preset_spec("qwen3-30b-a3b").kv_bytes_per_token(2) == 48 * 2 * 4 * 128 * 2
    assert preset_spec("mixtral-8x7b").kv_bytes_per_token(1) == 32 * 2 * 8 * 128


def test_flops_per_token_counts_attention_context() -> None:
    s = preset_spec("mixtral-8x7b")
    assert s.flops_per_token(1000) - s.flops_per_token(0) == 2 * 32 * 32 * (128 + 128) * 1000


def test_structure_of_deepseek_and_qwen() -> None:
    v3 = preset_spec("deepseek-v3")
    assert v3.dense_layers == (0, 1, 2) and v3.num_moe_layers == 58
    assert (v3.topk_method, v3.scoring_func, v3.n_group, v3.topk_group) == ("noaux_tc", "sigmoid", 8, 4)
    assert v3.shared_intermediate_size == 2048 and v3.routed_scaling_factor == 2.5
    lite = preset_spec("deepseek-v2-lite")
    assert lite.q_lora_rank is None and lite.rope_scaling["rope_type"] == "yarn"
    q = preset_spec("qwen1.5-moe-a2.7b")
    assert q.shared_expert_gate and q.shared_intermediate_size == 5632 and q.attention_bias


def test_unsupported_architecture_lists_supported() -> None:
    with pytest.raises(ValueError, match="supported: DeepseekV2ForCausalLM.*Qwen3MoeForCausalLM"):
        spec_from_hf_config({"architectures": ["LlamaForCausalLM"]})


def test_unknown_preset_lists_presets() -> None:
    with pytest.raises(ValueError, match="available: olmoe-1b-7b"):
        preset_config("gpt-5")


def test_overrides_keep_a_moe_layer_and_validate() -> None:
    cfg = apply_overrides(preset_config("deepseek-v3"), layers=2, experts=64)
    spec = spec_from_hf_config(cfg)
    assert spec.num_layers == 2 and spec.dense_layers == (0,) and spec.num_experts == 64
    with pytest.raises(ValueError, match="n_group"):
        apply_overrides(preset_config("deepseek-v3"), experts=60)
    with pytest.raises(ValueError, match="top_k"):
        apply_overrides(preset_config("olmoe-1b-7b"), experts=4, top_k=8)
    with pytest.raises(ValueError, match="needs >= 2 experts per group"):
        apply_overrides(preset_config("deepseek-v3"), experts=8, top_k=2)
    with pytest.raises(ValueError, match="applies to deepseek_v2, deepseek_v3, not olmoe"):
        apply_overrides(preset_config("olmoe-1b-7b"), n_group=2)
    with pytest.raises(ValueError, match="unknown override"):
        apply_overrides(preset_config("olmoe-1b-7b"), exprets=4)


def test_transformers5_rope_parameters_layout_is_read() -> None:
    cfg = preset_config("deepseek-v2-lite")
    scaling = cfg.pop("rope_scaling")
    cfg.pop("rope_theta")
    cfg["rope_parameters"] = dict(scaling, rope_theta=10000.0)
    spec = spec_from_hf_config(cfg)
    assert spec.rope_theta == 10000.0 and spec.rope_scaling["factor"] == 40


def test_transformers5_expert_count_spelling() -> None:
    cfg = preset_config("qwen3-30b-a3b")
    cfg["num_local_experts"] = cfg.pop("num_experts")
    assert spec_from_hf_config(cfg).num_experts == 128
