"""Mixtral (MixtralForCausalLM): GQA attention, top-2 softmax routing over 8 experts, renormalized."""

from __future__ import annotations

from moelab.layers.attention import GQAttention
from moelab.layers.moe.layer import SparseMoE
from moelab.layers.moe.router import RouterConfig
from moelab.models.decoder import DecoderLayer, MoECausalLM
from moelab.spec import ModelSpec


class MixtralForCausalLM(MoECausalLM):
    expert_proj_names = ("w1", "w3", "w2")

    def __init__(self, spec: ModelSpec, moe_backend: str = "naive", top_k: int | None = None) -> None:
        router = RouterConfig.from_spec(spec, top_k)
        layers = [DecoderLayer(spec, GQAttention(spec),
                               SparseMoE(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router,
                                         moe_backend), ffn_name="block_sparse_moe")
                  for _ in range(spec.num_layers)]
        super().__init__(spec, layers)
