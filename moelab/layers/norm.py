"""RMSNorm, computed in float32 and cast back (as the HF reference does); impl "triton" runs it as one kernel
(moelab.kernels.rms_norm) instead of about seven eager ones."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.impl = "torch"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.impl == "triton":
            from moelab.kernels.rms_norm import rms_norm

            return rms_norm(x, self.weight, self.eps)
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
