"""Qwen3-MoE (Qwen3MoeForCausalLM): GQA with per-head q/k RMSNorm, no shared expert, optional dense layers."""

from __future__ import annotations

from torch import nn

from moelab.layers.attention import GQAttention
from moelab.layers.mlp import GatedMLP
from moelab.layers.moe.layer import SparseMoE
from moelab.layers.moe.router import RouterConfig
from moelab.models.decoder import DecoderLayer, MoECausalLM
from moelab.spec import ModelSpec


class Qwen3MoeForCausalLM(MoECausalLM):
    def __init__(self, spec: ModelSpec, moe_backend: str = "naive", top_k: int | None = None) -> None:
        router = RouterConfig.from_spec(spec, top_k)

        def ffn(i: int) -> nn.Module:
            if not spec.is_moe_layer(i):
                return GatedMLP(spec.hidden_size, spec.intermediate_size)
            return SparseMoE(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router, moe_backend)

        super().__init__(spec, [DecoderLayer(spec, GQAttention(spec), ffn(i)) for i in range(spec.num_layers)])
