"""One-row linear layer (y = x @ W.T + b for a single token) as a Triton GEMV that loads its weights before it
waits for the kernel in front of it; `gemv_ref` beside it.

At decode with one sequence every dense projection is a matrix-vector product: it reads the whole weight once and
does almost no arithmetic, so its time is its bytes over the copy bandwidth plus the kernel's ramp-up and tail.
cuBLAS takes no part in programmatic dependent launch (moelab.kernels.pdl): its kernel starts only after the one
before it has finished, and the one after it waits for all of it. This kernel does take part, and each program
issues the load of its first weight chunk *before* `griddepcontrol.wait`: the weights are not written by any
kernel of a forward pass, so reading them early changes no result, and the reads of the next projection overlap
the tail of the kernel before it. x (the previous kernel's output) is read only after the wait.

One program per BLOCK_N output rows walks K in BLOCK_K chunks; float32 products summed per chunk, chunks in order,
the bias added in float32, one rounding to the output dtype (cuBLAS's order differs: results agree to float32
rounding of the sum, not bit for bit).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from moelab.device import num_sms
from moelab.kernels.pdl import gdc_prologue, launch_options

_ENABLED = True


def set_enabled(on: bool) -> None:
    """Off: moelab.layers.linear falls back to F.linear (cuBLAS) at one row too (for A/B timings; CUDA graphs
    must be recaptured)."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


@dataclass(frozen=True)
class GemvConfig:
    block_n: int
    block_k: int
    num_warps: int


@triton.jit
def _gemv_kernel(x_ptr, w_ptr, b_ptr, y_ptr, N, K, stride_w, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr,
                 BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_K)
    rmask = rows < N
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_w
    w = tl.load(w_rows + cols[None, :], mask=rmask[:, None] & (cols[None, :] < K), other=0.0)  # weights: no wait
    gdc_prologue(USE_PDL)
    x = tl.load(x_ptr + cols, mask=cols < K, other=0.0)
    acc = tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    for k0 in range(BLOCK_K, K, BLOCK_K):
        c = k0 + cols
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & (c[None, :] < K), other=0.0)
        x = tl.load(x_ptr + c, mask=c < K, other=0.0)
        acc += tl.sum(w.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(b_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    tl.store(y_ptr + rows, acc.to(y_ptr.dtype.element_ty), mask=rmask)


def default_config(N: int, K: int, num_sms: int = 132) -> GemvConfig:
    """From a sweep of 54 configs over 16 decode projections on an H200 (docs/perf/engine.md, v6; within 9 % of
    each shape's best): wide outputs (8-row programs still cover the SMs 2.5 times) take 8 rows x 1,024-value
    chunks on 4 warps; narrower ones 2 rows x 2,048-value chunks on 8 warps (fewer rows so the grid still fills
    the SMs, longer chunks so each program keeps enough bytes in flight); a one-column output one row."""
    if N >= 8 * 2.5 * num_sms:
        return GemvConfig(8, min(1024, triton.next_power_of_2(max(K, 16))), 4)
    return GemvConfig(1 if N < 2 else 2, min(2048, triton.next_power_of_2(max(K, 16))), 8)


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: GemvConfig | None = None) -> torch.Tensor:
    """x [1, K] (or [K]), weight [N, K] with a unit last stride, bias [N] or None -> [1, N] (or [N]) in x's dtype."""
    if x.shape[-1] != weight.shape[1] or x.numel() != weight.shape[1]:
        raise ValueError(f"gemv takes one row of {weight.shape[1]} values for a [{weight.shape[0]}, "
                         f"{weight.shape[1]}] weight, got x of shape {tuple(x.shape)}")
    if weight.stride(1) != 1:
        raise ValueError("gemv needs the weight's last dimension contiguous")
    N, K = weight.shape
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be [{N}], got {tuple(bias.shape)}")
    if bias is not None and bias.stride(0) != 1:
        bias = bias.contiguous()
    x = x.contiguous()
    y = torch.empty(*x.shape[:-1], N, dtype=x.dtype, device=x.device)
    cfg = config or default_config(N, K, num_sms(x.device))
    _gemv_kernel[(triton.cdiv(N, cfg.block_n),)](
        x, weight, bias if bias is not None else weight, y, N, K, weight.stride(0), HAS_BIAS=bias is not None,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, **launch_options(x.device))
    return y


def gemv_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The same product in float32 (then x's dtype): what the kernel computes up to summation order."""
    y = x.float() @ weight.float().T
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
