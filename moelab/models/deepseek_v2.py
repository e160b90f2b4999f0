"""DeepSeek-V2 and V3 (DeepseekV2ForCausalLM, DeepseekV3ForCausalLM): multi-head latent attention, dense
first layers, routed plus shared experts; V2 softmax greedy or group-limited routing, V3 sigmoid scores with
a correction bias and group-limited selection. Both scale routed weights by routed_scaling_factor."""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.mla import MLAttention
from moelab.layers.mlp import GatedMLP
from moelab.layers.moe.layer import SparseMoE, TopKRows
from moelab.layers.moe.router import RouterConfig
from moelab.models.decoder import DecoderLayer, MoECausalLM
from moelab.spec import ModelSpec


class DeepseekMoE(SparseMoE):
    def __init__(self, spec: ModelSpec, router: RouterConfig, backend: str) -> None:
        super().__init__(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router, backend)
        self.shared_experts = GatedMLP(spec.hidden_size, spec.shared_intermediate_size) \
            if spec.shared_intermediate_size else None

    def forward(self, x: torch.Tensor, sum_topk: bool = True,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | TopKRows:
        if self.shared_experts is None:
            return super().forward(x, sum_topk, routing)
        # the shared experts first: a given routing is then two launches old when the routed experts read it
        shared = self.shared_experts(x)
        out = super().forward(x, sum_topk, routing, routing_settled=routing is not None)
        if isinstance(out, TopKRows):  # the caller adds routed + shared inside its next kernel
            return out._replace(extra=shared)
        return out + shared


class DeepseekV2ForCausalLM(MoECausalLM):
    def __init__(self, spec: ModelSpec, moe_backend: str = "naive", top_k: int | None = None) -> None:
        router = RouterConfig.from_spec(spec, top_k)

        def ffn(i: int) -> nn.Module:
            if not spec.is_moe_layer(i):
                return GatedMLP(spec.hidden_size, spec.intermediate_size)
            return DeepseekMoE(spec, router, moe_backend)

        super().__init__(spec, [DecoderLayer(spec, MLAttention(spec), ffn(i)) for i in range(spec.num_layers)])


DeepseekV3ForCausalLM = DeepseekV2ForCausalLM
