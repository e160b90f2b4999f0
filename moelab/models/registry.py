"""Family name -> model class (a plain dict)."""

from __future__ import annotations

from moelab.models.decoder import MoECausalLM
from moelab.models.deepseek_v2 import DeepseekV2ForCausalLM
from moelab.models.mixtral import MixtralForCausalLM
from moelab.models.olmoe import OlmoeForCausalLM
from moelab.models.qwen2_moe import Qwen2MoeForCausalLM
from moelab.models.qwen3_moe import Qwen3MoeForCausalLM

MODELS: dict[str, type[MoECausalLM]] = {
    "mixtral": MixtralForCausalLM,
    "olmoe": OlmoeForCausalLM,
    "qwen2_moe": Qwen2MoeForCausalLM,
    "qwen3_moe": Qwen3MoeForCausalLM,
    "deepseek_v2": DeepseekV2ForCausalLM,
    "deepseek_v3": DeepseekV2ForCausalLM,
}
