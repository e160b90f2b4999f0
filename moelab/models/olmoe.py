"""OLMoE (OlmoeForCausalLM): MHA with q/k RMSNorm over all heads, optional QKV clipping, 64 experts top-8."""

from __future__ import annotations

from moelab.layers.attention import GQAttention
from moelab.layers.moe.layer import SparseMoE
from moelab.layers.moe.router import RouterConfig
from moelab.models.decoder import DecoderLayer, MoECausalLM
from moelab.spec import ModelSpec


class OlmoeForCausalLM(MoECausalLM):
    def __init__(self, spec: ModelSpec, moe_backend: str = "naive", top_k: int | None = None) -> None:
        router = RouterConfig.from_spec(spec, top_k)
        layers = [DecoderLayer(spec, GQAttention(spec),
                               SparseMoE(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router,
                                         moe_backend))
                  for _ in range(spec.num_layers)]
        super().__init__(spec, layers)
