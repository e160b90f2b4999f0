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

from moelab.kernels.pdl import early_reads, gdc_prologue, launch_options

_ONE_ROW_WARPS: int | None = None  # launch-shape experiments (set_one_row_warps); None: _warps's rule


def set_one_row_warps(n: int | None) -> None:
    """Warps of add_rms_norm's one-row launches (a sweep of the batch-1 step; None restores the default; CUDA
    graphs must be recaptured)."""
    global _ONE_ROW_WARPS
    if n is not None and n not in (1, 2, 4, 8, 16, 32):
        raise ValueError(f"warps must be a power of two in 1..32, got {n}")
    _ONE_ROW_WARPS = n


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
def _add_rms_norm_kernel(x_ptr, r_ptr, w_ptr, y_ptr, s_ptr, e_ptr, g_ptr, stride_x, stride_r, stride_y, stride_s,
                         stride_e, stride_g, dim, eps, BLOCK: tl.constexpr, TOP_K: tl.constexpr = 1,
                         HAS_EXTRA: tl.constexpr = False, HAS_GATE: tl.constexpr = False,
                         EARLY_R: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """TOP_K > 1: x holds TOP_K rows per output row (an MoE layer's router-weighted expert rows), summed in float32
    in row order and rounded to x's dtype first, exactly as moe_sum would have written them. HAS_EXTRA: e (e.g. a
    shared expert's output) is added to that, rounded, before the residual; HAS_GATE: e times sigmoid(g[row])
    (Qwen2-MoE's gated shared expert), each step rounded as activation.add_gated rounds it. The norm weight (no
    kernel writes it) is read before the PDL wait; so is r with EARLY_R (the caller's promise that r was written
    at least two launches earlier: the launch in front has passed its own wait, so everything before it is done)."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < dim
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    if EARLY_R:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    gdc_prologue(USE_PDL)
    if TOP_K == 1:
        x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    else:
        acc = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in tl.static_range(TOP_K):
            acc += tl.load(x_ptr + (row * TOP_K + k).to(tl.int64) * stride_x + cols, mask=mask,
                           other=0.0).to(tl.float32)
        x = acc.to(x_ptr.dtype.element_ty).to(tl.float32)
    if HAS_EXTRA:
        e = tl.load(e_ptr + row * stride_e + cols, mask=mask, other=0.0).to(tl.float32)
        if HAS_GATE:
            gf = tl.load(g_ptr + row * stride_g).to(tl.float32)
            sig = (1.0 / (1.0 + tl.exp(-gf))).to(x_ptr.dtype.element_ty).to(tl.float32)
            e = (sig * e).to(x_ptr.dtype.element_ty).to(tl.float32)
        x = (x + e).to(x_ptr.dtype.element_ty).to(tl.float32)
    if not EARLY_R:
        r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    summed = (x + r).to(s_ptr.dtype.element_ty)  # rounded like an eager add, then normalized
    tl.store(s_ptr + row * stride_s + cols, summed, mask=mask)
    v = summed.to(tl.float32)
    inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / dim + eps)
    tl.store(y_ptr + row * stride_y + cols, ((v * inv).to(y_ptr.dtype.element_ty) * w).to(y_ptr.dtype.element_ty),
             mask=mask)


def add_rms_norm(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, top_k: int = 1,
                 extra: torch.Tensor | None = None, extra_gate: torch.Tensor | None = None,
                 residual_settled: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(x + residual), x + residual) in one kernel; x, residual [rows, dim] of one dtype.
    top_k > 1: x is [rows * top_k, dim] and x + residual means moe_sum(x, top_k) + residual (the MoE layer's
    top-k sum happens here instead of in a kernel of its own). extra [rows, dim]: (x + extra) + residual, each
    sum rounded as eager adds would be (a shared expert's output added to the routed one). extra_gate [rows, 1]
    logits: (x + sigmoid(extra_gate) * extra) + residual (Qwen2-MoE's gated shared expert; no add_gated launch).
    residual_settled: the caller promises residual was written at least two kernel launches before this one; on
    the GPU it is then read before the PDL wait (same values, read earlier)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if x.dim() != 2 or residual.dim() != 2 or x.shape[1] != residual.shape[1] or \
            x.shape[0] != residual.shape[0] * top_k or x.dtype != residual.dtype:
        raise ValueError(f"x must be [rows * top_k, dim] and residual [rows, dim] of one dtype (top_k={top_k}), got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}")
    dim = x.shape[-1]
    if weight.shape != (dim,):
        raise ValueError(f"weight must be [{dim}], got {tuple(weight.shape)}")
    if extra is not None and (extra.shape != residual.shape or extra.dtype != residual.dtype):
        raise ValueError(f"extra must be like residual {tuple(residual.shape)} {residual.dtype}, got "
                         f"{tuple(extra.shape)} {extra.dtype}")
    if extra_gate is not None and (extra is None or extra_gate.shape != (residual.shape[0], 1)
                                   or extra_gate.dtype != residual.dtype):
        raise ValueError(f"extra_gate must be [{residual.shape[0]}, 1] {residual.dtype} logits beside an extra, got "
                         f"{tuple(extra_gate.shape)} {extra_gate.dtype}")
    x = x if x.stride(-1) == 1 else x.contiguous()
    if residual.stride(-1) != 1:  # a copy launched right in front: no longer two launches old
        residual, residual_settled = residual.contiguous(), False
    e = residual if extra is None else extra if extra.stride(-1) == 1 else extra.contiguous()
    g = residual if extra_gate is None else extra_gate
    y, summed = torch.empty_like(residual, memory_format=torch.contiguous_format), torch.empty_like(
        residual, memory_format=torch.contiguous_format)
    if residual.shape[0]:
        BLOCK = triton.next_power_of_2(dim)
        _add_rms_norm_kernel[(residual.shape[0],)](x, residual, weight, y, summed, e, g, x.stride(0),
                                                   residual.stride(0), y.stride(0), summed.stride(0), e.stride(0),
                                                   g.stride(0), dim, eps, BLOCK=BLOCK, TOP_K=top_k,
                                                   HAS_EXTRA=extra is not None, HAS_GATE=extra_gate is not None,
                                                   EARLY_R=residual_settled and early_reads(),
                                                   num_warps=_warps(BLOCK, residual.shape[0]),
                                                   **launch_options(x.device))
    return y, summed


def _warps(block: int, rows: int) -> int:
    """add_rms_norm's warps a program. One row of 2048 or more: 16 (its row is the batch-1 step's critical path: 4
    elements a thread instead of 16; OLMoE-1B-7B's step -0.018 ms on the H200, docs/perf/engine.md v11); more rows:
    4, or 8 past 2048 columns."""
    if rows == 1 and (_ONE_ROW_WARPS or block >= 2048):
        return _ONE_ROW_WARPS or 16
    return 4 if block <= 2048 else 8


def add_rms_norm_ref(x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, top_k: int = 1,
                     extra: torch.Tensor | None = None, extra_gate: torch.Tensor | None = None
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    if top_k > 1:  # moe_sum's rounding: a float32 sum of the k rows, then x's dtype
        x = x.float().view(-1, top_k, x.shape[1]).sum(dim=1).to(x.dtype)
    if extra is not None:
        x = x + (extra if extra_gate is None else torch.sigmoid(extra_gate) * extra)
    summed = x + residual
    return rms_norm_ref(summed, weight, eps), summed


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)
