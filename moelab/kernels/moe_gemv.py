"""The experts of one token as matrix-vector products (decode at batch 1), beside the tensor-core GEMMs of
fused_moe.py; `moe_gemv_ref` beside it.

At one token each of the top-k experts is a GEMV: the layer reads k experts' weights once and does almost no
arithmetic. fused_moe.py computes them with `tl.dot` over 16-row blocks of which one row is live. Here:

gate_up: program (column block j, slot s) reads the BLOCK_N gate rows and the BLOCK_N up rows of expert
    e = topk_ids[s] that make h[s, j*BLOCK_N:(j+1)*BLOCK_N] = silu(G x) * (U x), in BLOCK_K chunks (float32 sums).
down: program (row block j, slot s) computes y[s, rows] = w[s] * (W2[e][rows] h[s]). The expert ids were written
    by the router two launches earlier, so each program reads its expert id and issues the load of its first weight
    chunk *before* its PDL wait (moelab.kernels.pdl): when a kernel starts, the one before it has passed its own
    wait, so everything two launches back is complete. Only h, written by gate_up, is read after the wait.

Outputs are those of fused_moe's gate_up/down at naive blocks: h [K, I] and the router-weighted slot rows [K, D]
(summed by moe_sum or by the next add_rms_norm). Sums run in another order than the tensor cores', so results
agree to float32 rounding of the sums, not bit for bit. Unquantized weights only (bf16 / fp16 / fp32).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

_ENABLED = True


def set_enabled(on: bool) -> None:
    """Off: one-token MoE layers run fused_moe's tensor-core GEMMs (for A/B timings; CUDA graphs must be
    recaptured)."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


@dataclass(frozen=True)
class MoeGemvConfig:
    block_n: int  # output columns (gate_up: h columns, i.e. twice as many weight rows) per program
    block_k: int
    num_warps: int


def default_configs(D: int, I: int) -> tuple[MoeGemvConfig, MoeGemvConfig]:
    """(gate_up, down). From a sweep of 25 pairs on an H200 over the one-token layers of OLMoE, Qwen1.5-MoE,
    DeepSeek-V2-Lite, Qwen3-30B-A3B and Mixtral (docs/perf/engine.md, v9): gate_up 2 h columns (4 weight rows) a
    program in chunks of up to 1,024 values on 4 warps; down 8 rows in chunks of up to 512 on 4 warps. Best of 30
    pairs on OLMoE and Mixtral, within 2.5 % of the best on Qwen1.5-MoE and DeepSeek-V2-Lite, 9 % on Qwen3."""
    return (MoeGemvConfig(2, min(1024, triton.next_power_of_2(max(D, 16))), 4),
            MoeGemvConfig(8, min(512, triton.next_power_of_2(max(I, 16))), 4))


@triton.jit
def _moe_gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, I, D, stride_we, stride_wn, stride_h,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)  # the expert ids come from the kernel just before (the router)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    cmask = cols < I
    offs = tl.arange(0, BLOCK_K)
    g_rows = w_ptr + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    u_rows = g_rows + I * stride_wn
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        c = k0 + offs
        m = cmask[:, None] & (c[None, :] < D)
        x = tl.load(x_ptr + c, mask=c < D, other=0.0).to(tl.float32)[None, :]
        acc_g += tl.sum(tl.load(g_rows + c[None, :], mask=m, other=0.0).to(tl.float32) * x, axis=1)
        acc_u += tl.sum(tl.load(u_rows + c[None, :], mask=m, other=0.0).to(tl.float32) * x, axis=1)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + slot * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, w_ptr, ids_ptr, wt_ptr, y_ptr, D, I, stride_h, stride_we, stride_wn, stride_y,
                          BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, USE_PDL: tl.constexpr = False):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1)
    rmask = rows < D
    offs = tl.arange(0, BLOCK_K)
    # before the wait: the expert id and router weight (two launches back) and the first weight chunk
    e = tl.load(ids_ptr + slot).to(tl.int64)
    wt = tl.load(wt_ptr + slot).to(tl.float32)
    w_rows = w_ptr + e * stride_we + rows.to(tl.int64)[:, None] * stride_wn
    w = tl.load(w_rows + offs[None, :], mask=rmask[:, None] & (offs[None, :] < I), other=0.0)
    gdc_prologue(USE_PDL)
    h = tl.load(h_ptr + slot * stride_h + offs, mask=offs < I, other=0.0).to(tl.float32)
    acc = tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    for k0 in range(BLOCK_K, I, BLOCK_K):
        c = k0 + offs
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & (c[None, :] < I), other=0.0)
        h = tl.load(h_ptr + slot * stride_h + c, mask=c < I, other=0.0).to(tl.float32)
        acc += tl.sum(w.to(tl.float32) * h[None, :], axis=1)
    tl.store(y_ptr + slot * stride_y + rows, (acc * wt).to(y_ptr.dtype.element_ty), mask=rmask)


def applies(x: torch.Tensor, w13: torch.Tensor, quant: str | None) -> bool:
    """One token, unquantized weights of x's dtype, on a GPU, switched on."""
    return (_ENABLED and x.is_cuda and x.shape[0] == 1 and quant is None and w13.dtype == x.dtype
            and x.stride(-1) == 1 and w13.stride(-1) == 1)


def moe_gemv(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, configs: tuple[MoeGemvConfig, MoeGemvConfig] | None = None) -> torch.Tensor:
    """x [1, D], topk_ids [1, K], topk_weights [1, K], w13 [E, 2I, D], w2 [E, D, I] -> the router-weighted slot
    rows [K, D] in x's dtype (fused_moe(..., sum_topk=False) at one token)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"moe_gemv takes one token x [1, D], got {tuple(x.shape)}")
    D, (E, I2, Dw), K = x.shape[1], w13.shape, topk_ids.shape[1]
    I = I2 // 2
    if Dw != D or w2.shape != (E, D, I) or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}")
    gu, dn = configs or default_configs(D, I)
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    h = torch.empty(K, I, dtype=x.dtype, device=x.device)
    y = torch.empty(K, D, dtype=x.dtype, device=x.device)
    opts = launch_options(x.device)
    _moe_gate_up_gemv_kernel[(triton.cdiv(I, gu.block_n), K)](
        x, w13, ids, h, I, D, w13.stride(0), w13.stride(1), h.stride(0), BLOCK_N=gu.block_n, BLOCK_K=gu.block_k,
        num_warps=gu.num_warps, **opts)
    _moe_down_gemv_kernel[(triton.cdiv(D, dn.block_n), K)](
        h, w2, ids, wts, y, D, I, h.stride(0), w2.stride(0), w2.stride(1), y.stride(0), BLOCK_N=dn.block_n,
        BLOCK_K=dn.block_k, num_warps=dn.num_warps, **opts)
    return y


def moe_gemv_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """Plain torch, float32: the router-weighted slot rows [K, D] of one token."""
    ids = topk_ids.reshape(-1)
    I = w13.shape[1] // 2
    gu = torch.einsum("d,snd->sn", x[0].float(), w13[ids].float())
    h = (F.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype).float()  # h is stored in x's dtype between the two kernels
    return (torch.einsum("si,sdi->sd", h, w2[ids].float()) * topk_weights.reshape(-1, 1).float()).to(x.dtype)
