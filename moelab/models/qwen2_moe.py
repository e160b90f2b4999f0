"""Qwen2-MoE (Qwen2MoeForCausalLM; Qwen1.5-MoE, Qwen2-57B): QKV bias, routed experts plus one wide shared
expert scaled by a sigmoid gate, optional dense layers (mlp_only_layers, decoder_sparse_step)."""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.attention import GQAttention
from moelab.layers.linear import Linear
from moelab.layers.mlp import GatedMLP
from moelab.layers.moe.layer import SparseMoE, TopKRows
from moelab.layers.moe.router import RouterConfig
from moelab.models.decoder import DecoderLayer, MoECausalLM
from moelab.spec import ModelSpec

_FOLD = True


def set_fold(on: bool) -> None:
    """Off: the block sums its routed output and mixes in the gated shared expert itself (moe_sum and add_gated
    launches; no router fold), as before the mix moved into the next norm (for A/B timings; CUDA graphs must be
    recaptured)."""
    global _FOLD
    _FOLD = bool(on)


class Qwen2MoeBlock(SparseMoE):
    """Routed experts plus sigmoid(x g) * shared_expert(x). With sum_topk=False (the decoder's fused-residual path
    and a backend that defers the top-k sum) it hands back TopKRows carrying the shared output and the gate logits,
    so the routed sum, the gated mix and the residual add all happen in the next norm's kernel."""

    @property
    def takes_sum_topk(self) -> bool:
        return _FOLD

    def __init__(self, spec: ModelSpec, router: RouterConfig, backend: str) -> None:
        super().__init__(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router, backend)
        self.shared_expert = GatedMLP(spec.hidden_size, spec.shared_intermediate_size)
        self.shared_expert_gate = Linear(spec.hidden_size, 1, bias=False)
        self.fused_mix = False  # set with the fused routing by prepare_fast_path

    def use_fused_routing(self) -> None:
        super().use_fused_routing()
        self.fused_mix = True  # routed + sigmoid(gate) * shared as one kernel (moelab.kernels.activation)

    def forward(self, x: torch.Tensor, sum_topk: bool = True,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | TopKRows:
        gate, shared = self.shared_expert_gate(x), self.shared_expert(x)
        # a given routing was written by the router before the shared expert's launches: settled
        routed = super().forward(x, sum_topk, routing, routing_settled=routing is not None)
        if isinstance(routed, TopKRows):
            return routed._replace(extra=shared, gate=gate)
        fused = self.fused_mix and routed.dim() == 2
        if fused and (routed.is_cuda or routed.dtype != torch.bfloat16):  # bf16 only checked on the GPU
            from moelab.kernels.activation import add_gated

            return add_gated(routed, shared, gate)
        return routed + torch.sigmoid(gate) * shared


class Qwen2MoeForCausalLM(MoECausalLM):
    def __init__(self, spec: ModelSpec, moe_backend: str = "naive", top_k: int | None = None) -> None:
        router = RouterConfig.from_spec(spec, top_k)

        def ffn(i: int) -> nn.Module:
            if not spec.is_moe_layer(i):
                return GatedMLP(spec.hidden_size, spec.intermediate_size)
            return Qwen2MoeBlock(spec, router, moe_backend)

        super().__init__(spec, [DecoderLayer(spec, GQAttention(spec), ffn(i)) for i in range(spec.num_layers)])
