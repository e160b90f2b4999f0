"""The MoE layer: router weights, stacked expert weights, and the call into a backend.

Checkpoints hold one tensor per expert and projection; `ExpertWeights.load_expert` copies each into its
slot of the stacked w13 [E, 2I, D] (gate rows first, then up rows) and w2 [E, D, I]. Under expert
parallelism this is where a rank keeps only its own experts. Shared experts belong to the family's block.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from moelab.layers.moe.backends import get_backend
from moelab.layers.moe.router import RouterConfig, route

PROJ_SLOT = {"gate": ("w13", 0), "up": ("w13", 1), "down": ("w2", None)}


class Router(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, correction_bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        if correction_bias:
            # float32 in DeepSeek-V3 checkpoints; kept float32 whatever the model dtype
            self.e_score_correction_bias = nn.Parameter(torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.e_score_correction_bias = None
        self.weight_f32: torch.Tensor | None = None  # a float32 copy kept by prepare_fast_path()

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """[T, E] router logits in float32 (as the references compute them)."""
        w = self.weight_f32 if self.weight_f32 is not None else self.weight.float()
        return x.float() @ w.T


class ExpertWeights(nn.Module):
    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.num_experts, self.intermediate_size = num_experts, intermediate_size
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    @torch.no_grad()
    def load_expert(self, expert: int, proj: str, tensor: torch.Tensor) -> None:
        """Copy one checkpoint tensor (proj in gate/up/down) into the stacked weights."""
        name, half = PROJ_SLOT[proj]
        param = getattr(self, name)[expert]
        if half is not None:
            I = self.intermediate_size
            param = param[half * I:(half + 1) * I]
        if tuple(tensor.shape) != tuple(param.shape):
            raise ValueError(f"expert {expert} {proj}: shape {tuple(tensor.shape)}, expected {tuple(param.shape)}")
        param.copy_(tensor)


class TopKRows(NamedTuple):
    """An MoE layer's output before its top-k sum: rows [T*K, D] (slot t*K + k, router-weighted), plus an extra
    [T, D] addend (shared experts) or None, scaled by sigmoid(gate) when gate [T, 1] logits are given (Qwen2-MoE),
    for a caller that sums them inside its next kernel (rms_norm.add_rms_norm(rows, residual, ..., top_k=top_k,
    extra=extra, extra_gate=gate))."""

    rows: torch.Tensor
    top_k: int
    extra: torch.Tensor | None = None
    gate: torch.Tensor | None = None


class SparseMoE(nn.Module):
    """Routed experts only: x [T, D] -> [T, D].

    takes_sum_topk: forward(x, sum_topk=False) may hand back TopKRows (when the backend defers_topk_sum); a subclass
    whose forward does arithmetic on the routed output sets it False. Forward hooks on such a block see TopKRows on
    the decoder's fused-residual path."""

    takes_sum_topk = True

    def __init__(self, num_experts: int, hidden_size: int, intermediate_size: int, router: RouterConfig,
                 backend: str = "naive") -> None:
        super().__init__()
        self.router_config = router
        self.gate = Router(num_experts, hidden_size, correction_bias=router.topk_method == "noaux_tc")
        self.experts = ExpertWeights(num_experts, hidden_size, intermediate_size)
        self.backend = get_backend(backend)
        # set by the engine's routing recorder: this layer's row of the counts buffer, and the valid-row mask
        self.routing_counts: torch.Tensor | None = None
        self.routing_valid: torch.Tensor | None = None
        self.fused_routing = False  # one-kernel top-k (moelab.kernels.topk_router); set by prepare_fast_path

    def use_fused_routing(self) -> None:
        """Plain top-k of softmax/sigmoid scores goes through one kernel; group-limited schemes stay in torch."""
        self.fused_routing = self.router_config.topk_method == "greedy"

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> (topk_weights [T, K] float32, topk_ids [T, K] int64)."""
        cfg = self.router_config
        w = self.gate.weight
        # the router GEMM inside the top-k kernel (bf16 tl.dot is wrong under the CPU interpreter: logits first)
        if self.fused_routing and x.dtype == w.dtype and (x.is_cuda or x.dtype != torch.bfloat16):
            from moelab.kernels.topk_router import router_topk

            return router_topk(x, w, cfg.top_k, cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        logits = self.gate.logits(x)
        if self.fused_routing:
            from moelab.kernels.topk_router import topk_router

            return topk_router(logits, cfg.top_k, cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor)
        return route(logits, cfg, self.gate.e_score_correction_bias)

    @property
    def defers_topk_sum(self) -> bool:
        return getattr(self.backend, "defers_topk_sum", False)

    def fold_norm_into_router(self, x: torch.Tensor) -> bool:
        """Whether the caller may compute this block's routing of the one row x together with the norm in front
        (moelab.kernels.topk_router.add_norm_router_topk) and pass it to forward as `routing`."""
        from moelab.kernels.topk_router import norm_fold_enabled

        # D <= 2048: the widths it was measured at (OLMoE, Qwen1.5, DeepSeek-V2-Lite). The folded norm sums the row's
        # squares with the router kernel's 4 warps, the one-row add_rms_norm with 16 (rms_norm._warps): another
        # order, so y can differ by a bf16 rounding from the two-kernel path (the CUDA test checks both).
        return (self.fused_routing and self.takes_sum_topk and x.dim() == 2 and x.shape[0] == 1
                and x.shape[1] <= 2048 and x.dtype == self.gate.weight.dtype
                and (x.is_cuda or x.dtype != torch.bfloat16) and norm_fold_enabled())

    def add_norm_route(self, x: torch.Tensor, residual: torch.Tensor, norm: nn.Module, residual_settled: bool = False
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """One row (see fold_norm_into_router): (norm(x + residual), x + residual, topk_weights, topk_ids) in one
        kernel, the norm in front of this block folded into its router. A method of the block, so that whatever
        wraps route (the lab's profile ranges) can wrap this too. residual_settled: see rms_norm.add_rms_norm."""
        from moelab.kernels.topk_router import add_norm_router_topk

        cfg = self.router_config
        return add_norm_router_topk(x, residual, norm.weight, norm.eps, self.gate.weight, cfg.top_k,
                                    cfg.scoring_func, cfg.norm_topk_prob, cfg.routed_scaling_factor,
                                    residual_settled=residual_settled)

    def forward(self, x: torch.Tensor, sum_topk: bool = True,
                routing: tuple[torch.Tensor, torch.Tensor] | None = None,
                routing_settled: bool = False) -> torch.Tensor | TopKRows:
        """x [T, D] -> [T, D]; sum_topk=False with a backend that defers_topk_sum: TopKRows instead. routing:
        (topk_weights, topk_ids) already computed for x (see fold_norm_into_router), else route(x); a subclass
        that overrides forward and keeps takes_sum_topk must take and pass on `routing` too. routing_settled: the
        given routing was written at least two kernel launches before this call (a subclass that ran its shared
        expert in between says so); a backend that `takes_settled_routing` may then read it before its PDL wait."""
        topk_weights, topk_ids = (routing if routing is not None else self.route(x))[:2]  # (a third: see Qwen2)
        if self.routing_counts is not None:
            T, K = topk_ids.shape
            valid = self.routing_valid[:T, None].expand(T, K).reshape(-1)
            self.routing_counts.scatter_add_(0, topk_ids.reshape(-1), valid)
        args = (x, topk_ids, topk_weights, self.experts.w13, self.experts.w2, getattr(self.experts, "scales", None))
        kw = {"routing_settled": True} if routing_settled and routing is not None and getattr(
            self.backend, "takes_settled_routing", False) else {}
        if not sum_topk and self.defers_topk_sum:
            return TopKRows(self.backend(*args, sum_topk=False, **kw), topk_ids.shape[1])
        return self.backend(*args, **kw)
