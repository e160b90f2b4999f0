"""The dense linear layer of every model: `nn.Linear` with the same parameters and checkpoint names, whose one-row
products on a CUDA device run as moelab's GEMV (moelab.kernels.gemv: takes part in programmatic dependent launch
and reads its weights before waiting for the kernel in front of it); everything else is F.linear. Tensor-parallel
shards of it will be subclasses here."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab import device


def use_gemv(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """One row on a CUDA device, weight on the same device in x's dtype with a unit last stride, no autograd
    recording (the kernel has no backward), and the GEMV not switched off."""
    if not (device.is_gpu(x) and x.numel() == x.shape[-1] and x.dim() <= 2 and weight.device == x.device
            and weight.dtype == x.dtype and weight.dim() == 2 and weight.stride(1) == 1):
        return False
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        return False
    from moelab.kernels import gemv

    return gemv.enabled()


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear(x, weight, bias); a single row on the GPU goes through the GEMV kernel. The GEMV reads `weight`
    before waiting for the kernel in front of it: pass only tensors that no kernel of the forward pass writes
    (parameters, or buffers built once at load)."""
    if use_gemv(x, weight):
        from moelab.kernels.gemv import gemv

        return gemv(x, weight, bias)
    return F.linear(x, weight, bias)


class Linear(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)
