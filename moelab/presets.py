"""Presets: the published config.json of each studied model (shape fields), and its published totals.

The dicts keep each family's own key names, so `make-checkpoint` writes them as they are. DeepSeek-V3's
real checkpoint ships FP8 block-quantized weights plus one multi-token-prediction layer; the preset
describes the 61-layer main model in bf16, which is what the published 671B total counts.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from moelab.hf_config import spec_from_hf_config
from moelab.spec import ModelSpec

_DEEPSEEK_YARN = {"type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                  "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}

_CONFIGS: dict[str, dict[str, Any]] = {
    "olmoe-1b-7b": dict(
        architectures=["OlmoeForCausalLM"], model_type="olmoe", vocab_size=50304, hidden_size=2048,
        intermediate_size=1024, num_hidden_layers=16, num_attention_heads=16, num_key_value_heads=16,
        num_experts=64, num_experts_per_tok=8, norm_topk_prob=False, clip_qkv=None, attention_bias=False,
        max_position_embeddings=4096, rope_theta=10000.0, rope_scaling=None, rms_norm_eps=1e-5,
        tie_word_embeddings=False, hidden_act="silu", router_aux_loss_coef=0.01,
        bos_token_id=None, eos_token_id=50279, pad_token_id=1,
    ),
    "qwen1.5-moe-a2.7b": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=5632, moe_intermediate_size=1408, shared_expert_intermediate_size=5632,
        num_hidden_layers=24, num_attention_heads=16, num_key_value_heads=16, num_experts=60,
        num_experts_per_tok=4, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=8192, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=32768, max_window_layers=21, hidden_act="silu",
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen2-57b-a14b": dict(
        architectures=["Qwen2MoeForCausalLM"], model_type="qwen2_moe", vocab_size=151936, hidden_size=3584,
        intermediate_size=18944, moe_intermediate_size=2560, shared_expert_intermediate_size=20480,
        num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, num_experts=64,
        num_experts_per_tok=8, norm_topk_prob=False, decoder_sparse_step=1, mlp_only_layers=[],
        max_position_embeddings=131072, rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=131072, max_window_layers=28, hidden_act="silu",
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151643,
    ),
    "qwen3-30b-a3b": dict(
        architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe", vocab_size=151936, hidden_size=2048,
        intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=48, num_attention_heads=32,
        num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8, norm_topk_prob=True,
        decoder_sparse_step=1, mlp_only_layers=[], attention_bias=False, max_position_embeddings=40960,
        rope_theta=1000000.0, rope_scaling=None, rms_norm_eps=1e-6, tie_word_embeddings=False,
        use_sliding_window=False, sliding_window=None, max_window_layers=48, hidden_act="silu",
        router_aux_loss_coef=0.001, bos_token_id=151643, eos_token_id=151645,
    ),
    "mixtral-8x7b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32000, hidden_size=4096,
        intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=32768, rope_theta=1000000.0,
        rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
        router_aux_loss_coef=0.02, bos_token_id=1, eos_token_id=2,
    ),
    "mixtral-8x22b": dict(
        architectures=["MixtralForCausalLM"], model_type="mixtral", vocab_size=32768, hidden_size=6144,
        intermediate_size=16384, num_hidden_layers=56, num_attention_heads=48, num_key_value_heads=8,
        num_local_experts=8, num_experts_per_tok=2, max_position_embeddings=65536, rope_theta=1000000.0,
        rms_norm_eps=1e-5, sliding_window=None, tie_word_embeddings=False, hidden_act="silu",
        router_aux_loss_coef=0.001, bos_token_id=1, eos_token_id=2,
    ),
    "deepseek-v2-lite": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
        intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
        num_key_value_heads=16, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, topk_method="greedy", n_group=1, topk_group=1,
        scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0, q_lora_rank=None,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, attention_bias=False,
        max_position_embeddings=163840, rope_theta=10000, rope_scaling=dict(_DEEPSEEK_YARN),
        rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu", bos_token_id=100000,
        eos_token_id=100001,
    ),
    "deepseek-v2": dict(
        architectures=["DeepseekV2ForCausalLM"], model_type="deepseek_v2", vocab_size=102400, hidden_size=5120,
        intermediate_size=12288, moe_intermediate_size=1536, num_hidden_layers=60, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=160, n_shared_experts=2, num_experts_per_tok=6,
        first_k_dense_replace=1, moe_layer_freq=1, topk_method="group_limited_greedy", n_group=8,
        topk_group=3, scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=16.0,
        q_lora_rank=1536, kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128,
        attention_bias=False, max_position_embeddings=163840, rope_theta=10000,
        rope_scaling=dict(_DEEPSEEK_YARN), rms_norm_eps=1e-6, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=100000, eos_token_id=100001,
    ),
    "deepseek-v3": dict(
        architectures=["DeepseekV3ForCausalLM"], model_type="deepseek_v3", vocab_size=129280, hidden_size=7168,
        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
        first_k_dense_replace=3, moe_layer_freq=1, topk_method="noaux_tc", n_group=8, topk_group=4,
        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5, q_lora_rank=1536,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, attention_bias=False,
        max_position_embeddings=163840, rope_theta=10000,
        rope_scaling=dict(_DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=1.0), rms_norm_eps=1e-6,
        tie_word_embeddings=False, hidden_act="silu", num_nextn_predict_layers=1, bos_token_id=0,
        eos_token_id=1,
    ),
}


@dataclass(frozen=True)
class Published:
    """Totals the model's authors publish; `active_convention` says whether their active count
    includes the input embedding ("with_embedding") or not ("without_embedding")."""

    hf_id: str
    total: float
    active: float
    active_convention: str = "with_embedding"


PUBLISHED: dict[str, Published] = {
    "olmoe-1b-7b": Published("allenai/OLMoE-1B-7B-0924", 6.9e9, 1.3e9),
    "qwen1.5-moe-a2.7b": Published("Qwen/Qwen1.5-MoE-A2.7B", 14.3e9, 2.7e9),
    "qwen2-57b-a14b": Published("Qwen/Qwen2-57B-A14B", 57.4e9, 14e9),
    "qwen3-30b-a3b": Published("Qwen/Qwen3-30B-A3B", 30.5e9, 3.3e9),
    "mixtral-8x7b": Published("mistralai/Mixtral-8x7B-v0.1", 46.7e9, 12.9e9),
    "mixtral-8x22b": Published("mistralai/Mixtral-8x22B-v0.1", 141e9, 39e9),
    "deepseek-v2-lite": Published("deepseek-ai/DeepSeek-V2-Lite", 15.7e9, 2.4e9, "without_embedding"),
    "deepseek-v2": Published("deepseek-ai/DeepSeek-V2", 236e9, 21e9, "without_embedding"),
    "deepseek-v3": Published("deepseek-ai/DeepSeek-V3", 671e9, 37e9, "without_embedding"),
}

PRESETS = tuple(_CONFIGS)


def preset_config(name: str) -> dict[str, Any]:
    """A deep copy of the preset's HF config dict."""
    key = name.lower()
    if key not in _CONFIGS:
        raise ValueError(f"unknown preset {name!r}; available: {', '.join(PRESETS)}")
    return copy.deepcopy(_CONFIGS[key])


def preset_spec(name: str) -> ModelSpec:
    return spec_from_hf_config(preset_config(name))
