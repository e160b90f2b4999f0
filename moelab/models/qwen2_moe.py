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
_GATE_IN_ROUTER = True


def set_gate_in_router(on: bool) -> None:
    """Off: the shared expert's gate is its own GEMV launch instead of one more row of the router kernel (for A/B
    timings; takes effect at prepare_fast_path; CUDA graphs must be recaptured)."""
    global _GATE_IN_ROUTER
    _GATE_IN_ROUTER = bool(on)


def set_fold(on: bool) -> None:
    """Off: the block sums its routed output and mixes in the gated shared expert itself (moe_sum and add_gated
    launches; no router fold), as before the mix moved into the next norm (for A/B timings; CUDA graphs must be
    recaptured)."""
    global _FOLD
    _FOLD = bool(on)


class Qwen2MoeBlock(SparseMoE):
    """Routed experts plus sigmoid(x g) * shared_expert(x). With sum_topk=False (the decoder's fused-residual path
    and a backend that defers the top-k sum) it hands back TopKRows carrying the shared output and the gate logits,
    so the routed sum, the gated mix and the residual add all happen in the next norm's kernel. With the fused
    routing the shared expert's gate is one more row of the router's weight (`gate_rows`, the router and gate
    weights become views of it): the router kernel returns its logits beside the routing, no GEMV of its own. Only
    at more than one row: a one-row step (the norm-and-router kernel, or the router alone) keeps the gate apart,
    because there the extra row cost +0.09 ms a Qwen1.5-MoE step on the H200 (the router kernel's exposed time
    5.8 -> 8.7 us a layer, docs/perf/engine.md v11) while it saved 0.17 ms at 64 rows."""

    @property
    def takes_sum_topk(self) -> bool:
        return _FOLD

    def __init__(self, spec: ModelSpec, router: RouterConfig, backend: str) -> None:
        super().__init__(spec.num_experts, spec.hidden_size, spec.moe_intermediate_size, router, backend)
        self.shared_expert = GatedMLP(spec.hidden_size, spec.shared_intermediate_size)
        self.shared_expert_gate = Linear(spec.hidden_size, 1, bias=False)
        self.fused_mix = False  # set with the fused routing by prepare_fast_path
        self.gate_rows: torch.Tensor | None = None  # [E + 1, D]: router rows, then the shared gate's

    @torch.no_grad()
    def use_fused_routing(self) -> None:
        super().use_fused_routing()
        self.fused_mix = True  # routed + sigmoid(gate) * shared as one kernel (moelab.kernels.activation)
        g, s = self.gate.weight, self.shared_expert_gate.weight
        E = g.shape[0]
        # the router's power-of-two expert block (moelab.kernels.topk_router) has a free column
        spare = max(16, 1 << E.bit_length()) == max(16, 1 << (E - 1).bit_length())
        # (E = 64, Qwen2-57B: one more row would double the block and change the routing's summation order)
        if self.fused_routing and _GATE_IN_ROUTER and spare and self.gate_rows is None and g.dtype == s.dtype \
                and g.device == s.device:
            rows = torch.cat([g, s])
            self.gate.weight = nn.Parameter(rows[:-1], requires_grad=False)
            self.shared_expert_gate.weight = nn.Parameter(rows[-1:], requires_grad=False)
            self.gate_rows = rows

    def _gate_rows_for(self, x: torch.Tensor) -> torch.Tensor | None:
        """The combined rows when the router kernel takes x (as SparseMoE.route's first branch decides), x has more
        than one row (where it was measured faster) and both weights still view the rows (a replaced or moved
        weight falls back to the separate gate)."""
        rows = self.gate_rows
        if rows is None or x.shape[0] <= 1 or not self.fused_routing:
            return None
        ok = x.dtype == rows.dtype and x.device == rows.device and rows.data_ptr() == self.gate.weight.data_ptr() \
            and self.shared_expert_gate.weight.data_ptr() == rows[-1:].data_ptr() \
            and (x.is_cuda or x.dtype != torch.bfloat16)
        return rows if ok else None

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """SparseMoE.route's (weights, ids), plus the shared gate's logits [T, 1] when the router kernel computed
        them as its extra row."""
        rows = self._gate_rows_for(x)
        if rows is None:
            return super().route(x)
        from moelab.kernels.topk_router import router_topk

        cfg = self.router_config
        return router_topk(x, rows, cfg.top_k, cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                           extra_row=True)

    def forward(self, x: torch.Tensor, sum_topk: bool = True,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor | TopKRows:
        if routing is None and self._gate_rows_for(x) is not None:
            routing = self.route(x)  # the shared gate's logits come with it
        gate = routing[2] if routing is not None and len(routing) > 2 else self.shared_expert_gate(x)
        shared = self.shared_expert(x)
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
