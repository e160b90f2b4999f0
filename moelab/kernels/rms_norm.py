"""RMSNorm in one Triton kernel (one program per row, float32 math), with `rms_norm_ref` beside it; and the
residual add fused in front of it (`add_rms_norm`, with `add_rms_norm_ref`).

y = weight * cast(x / sqrt(mean(x^2) + eps)) — the cast to x's dtype happens before the weight multiply, as in
the Hugging Face reference, so the kernel rounds at the same point. x is [rows, dim] with a unit last stride
(per-head norms pass q viewed as [T*H, head_dim]).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, stride_x, stride_y, dim, eps, BLOCK: tl.constexpr,
                     USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(x * x, axis=0) / dim + eps)
    normed = (x * inv).to(y_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * stride_y + cols, (normed * w).to(y_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., dim] -> same shape and dtype."""
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    x2 = x.reshape(-1, dim)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    y = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    if x2.shape[0]:
        BLOCK = triton.next_power_of_2(dim)
        _rms_norm_kernel[(x2.shape[0],)](x2, weight, y, x2.stride(0), y.stride(0), dim, eps, BLOCK=BLOCK,
                                         num_warps=4 if BLOCK <= 2048 else 8, **launch_options(x.device))
    return y.view(x.shape)


@triton.jit
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, stride_x, stride_r, stride_y, stride_s, dim, eps,
                         BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + r).to(s_ptr.dtype.element_ty)  # rounded like an eager add, then normalized
    tl.store(s_ptr + row * stride_s + cols, summed, mask=mask)
    v = summed.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / dim + eps)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(y_ptr + row * stride_y + cols, ((v * inv).to(y_ptr.dtype.element_ty) * w).to(y_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one kernel; x, residual [rows, dim] of one dtype."""
    if x.shape != residual.shape or x.dtype != residual.dtype or x.dim() != 2:
        raise ValueError(f"x and residual must be [rows, dim] of one dtype, got {tuple(x.shape)} {x.dtype} and "
                         f"{tuple(residual.shape)} {residual.dtype}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    residual = residual if residual.stride(-1) == 1 else residual.contiguous()
    y, summed = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)
    if x.shape[0]:
        BLOCK = triton.next_power_of_2(dim)
        _add_rms_norm_kernel[(x.shape[0],)](x, residual, weight, y, summed, x.stride(0), residual.stride(0),
                                            y.stride(0), summed.stride(0), dim, eps, BLOCK=BLOCK,
                                            num_warps=4 if BLOCK <= 2048 else 8, **launch_options(x.device))
    return y, summed


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
