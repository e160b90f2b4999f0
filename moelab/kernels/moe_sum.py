"""Top-k sum of the MoE layer: out[t] = sum over k of y[t*K + k], the down GEMM's router-weighted rows.

float32 accumulation in slot order, so the result does not depend on timing (no atomics).
Variants: `moe_sum` (Triton), `moe_sum_ref` (torch `view(T, K, D).sum(1)`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options


@triton.jit(do_not_specialize=["num_tokens"])
def _sum_kernel(y_ptr, out_ptr, num_tokens, D, TOP_K: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
                USE_PDL: tl.constexpr = False):
    """out[t, d-tile] = sum over k (in order) of y[t * TOP_K + k, d-tile], accumulated in float32. The k loop is
    unrolled, so all TOP_K row loads are in flight at once (a runtime loop issued them one after another)."""
    gdc_prologue(USE_PDL)
    t = (tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)).to(tl.int64)
    d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    mask = (t[:, None] < num_tokens) & (d[None, :] < D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    for k in tl.static_range(TOP_K):
        acc += tl.load(y_ptr + (t * TOP_K + k)[:, None] * D + d[None, :], mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + t[:, None] * D + d[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def moe_sum(y: torch.Tensor, top_k: int) -> torch.Tensor:
    """y [T*K, D] (slot rows, contiguous) -> [T, D]: the top-k sum of each token's rows."""
    n, D = y.shape
    T = n // top_k
    out = torch.empty(T, D, dtype=y.dtype, device=y.device)
    block_d = min(1024, triton.next_power_of_2(D))
    block_t = max(1, 2048 // block_d)
    _sum_kernel[(triton.cdiv(T, block_t), triton.cdiv(D, block_d))](y, out, T, D, TOP_K=top_k, BLOCK_T=block_t,
                                                                     BLOCK_D=block_d, num_warps=4,
                                                                     **launch_options(y.device))
    return out


def moe_sum_ref(y: torch.Tensor, top_k: int) -> torch.Tensor:
    return y.view(-1, top_k, y.shape[1]).sum(dim=1)
