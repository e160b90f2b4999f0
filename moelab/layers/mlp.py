"""Dense SiLU-gated MLP: dense layers and shared experts."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.kernels.moe_gemv import dense_applies, gate_up_gemv
from moelab.layers.linear import Linear, linear


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int) -> None:
        super().__init__()
        self.gate_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = Linear(intermediate_size, hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None
        self.fused_act = False  # silu(gate) * up as one kernel (moelab.kernels.activation); set by fuse_gate_up

    @torch.no_grad()
    def fuse_gate_up(self) -> None:
        """One GEMM for gate and up: both weights move into one buffer and become views of it (no extra memory);
        silu(gate) * up then runs as one kernel."""
        self.fused_act = True
        if self.gate_up_weight is not None:
            return
        self.gate_up_weight = torch.cat([self.gate_proj.weight, self.up_proj.weight])
        g, u = self.gate_up_weight.chunk(2)
        self.gate_proj.weight = nn.Parameter(g, requires_grad=False)
        self.up_proj.weight = nn.Parameter(u, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is not None:
            if self.fused_act and dense_applies(x, self.gate_up_weight):  # one row on a GPU: one launch
                return self.down_proj(gate_up_gemv(x, self.gate_up_weight))
            gu = linear(x, self.gate_up_weight)
            if self.fused_act and gu.dim() == 2 and (gu.is_cuda or gu.dtype != torch.bfloat16):
                from moelab.kernels.activation import silu_mul

                return self.down_proj(silu_mul(gu))
            gate, up = gu.chunk(2, dim=-1)
            return self.down_proj(F.silu(gate) * up)
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
