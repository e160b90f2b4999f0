"""Fused MoE experts: two Triton grouped GEMMs over the aligned routing of moe_align.py.

gate_up: h[r] = silu(x[t] G[e]^T) * (x[t] U[e]^T) for each sorted row r (slot s = t*K + k of expert e), with
    G, U the gate and up rows of w13 [E, 2I, D]; h [P, I] in the activation dtype, rows in sorted order
    (padding rows hold zeros), so the down GEMM reads its rows contiguously.
down: y[s] = w[s] * (h[r] W2[e]^T) [T*K, D], rows in slot order.
sum: out[t] = sum_k y[t*K + k] [T, D] (moe_sum.py).

Both accumulate in float32 and write the activation dtype.

Quantized experts (`quant`, formats as in moelab/layers/moe/quant.py; W = Q * S):
- int8_channel (W8A16): int8 weight tiles are converted to the activation dtype inside the K loop (exact: |Q|
  <= 127), the per-output-channel scale S [E, N] multiplies the fp32 accumulator in the epilogue.
- fp8_tensor / fp8_channel / fp8_block (W8A8): x (and h between the GEMMs) are quantized per token (s [rows],
  the arithmetic of per_token_quant.py); fp8 x fp8 `tl.dot` with fp32 accumulation; the epilogue multiplies by
  s[row] and by S (per expert [E] or per output channel [E, N]); 128x128 block scales [E, N/128, K/128] multiply
  each K-tile's partial product instead (BLOCK_K is capped at 128 so that a K-tile never straddles two blocks).
  Where the quantization happens (ACT_QUANT, the same values either way):
  "separate": a per_token_quant launch for x and one for h;
  "fused" (default): x by extra programs of the moe_align launch (moe_align_quant) where there is one (not at
  naive blocks), h by its own per_token_quant launch. (Quantizing inside the GEMMs instead was measured and
  dropped: docs/perf/moe_kernels.md, v3 and v5.)

The grid is sized on the host from (T*K, E, BLOCK_M); programs past the padded row count return at once, so
nothing reads the routing on the host and the whole layer can be captured in a CUDA graph.
Decode (see fused_moe_config.use_naive_blocks) skips the sort: program row-block b holds slot b alone.

Variants: `fused_moe` (Triton, tile config from fused_moe_config), `fused_moe_ref` (plain torch, float32).
"""

from __future__ import annotations

import functools
import os
from dataclasses import replace
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig, get_config, use_naive_blocks
from moelab.kernels.moe_align import moe_align, moe_align_quant
from moelab.kernels.moe_gemv import applies as moe_gemv_applies
from moelab.kernels.moe_gemv import moe_gemv
from moelab.kernels.moe_sum import moe_sum
from moelab.kernels.pdl import gdc_prologue, launch_options
from moelab.kernels.per_token_quant import per_token_quant

NAIVE_BLOCK_M = 16
ACT_QUANT = "fused"  # or "separate" (see the module docstring; set_act_quant)
SWAP_AB_FP8 = True  # see swap_ab(); False only for A/B timings
MERGE_GU_BLOCK = False  # see merge_gate_up(); off until measured on a GPU (docs/perf/moe_kernels.md, session 15)
WARP_SPEC_DOWN = False  # see warp_spec_down(); off until measured on a GPU (docs/perf/moe_kernels.md, session 15)
# quantized formats (moelab/layers/moe/quant.py): the kernels' W_SCALE code (1 per expert, 2 per output channel,
# 3 per 128x128 block) and the weight dtype
QUANT_FORMATS = {"fp8_tensor": (1, torch.float8_e4m3fn), "fp8_channel": (2, torch.float8_e4m3fn),
                 "fp8_block": (3, torch.float8_e4m3fn), "int8_channel": (2, torch.int8)}
SCALE_BLOCK = 128


@triton.jit
def _tile(num_pid_m, num_pid_n, group_m):
    """(pid_m, pid_n) of this program; group_m row-blocks run side by side down each column of tiles."""
    pid = tl.program_id(0)
    width = group_m * num_pid_n
    first_m = (pid // width) * group_m
    size_m = tl.minimum(num_pid_m - first_m, group_m)
    return first_m + (pid % width) % size_m, (pid % width) // size_m


@triton.jit
def _rows(pid_m, sorted_ids_ptr, expert_ids_ptr, topk_ids_ptr, num_slots, BLOCK_M: tl.constexpr,
          NAIVE: tl.constexpr):
    """(expert [int64], slots [BLOCK_M] int32) of row-block pid_m; slot == num_slots marks padding."""
    lanes = tl.arange(0, BLOCK_M)
    if NAIVE:
        expert = tl.load(topk_ids_ptr + pid_m).to(tl.int64)
        slots = tl.where(lanes == 0, pid_m, num_slots)
    else:
        expert = tl.load(expert_ids_ptr + pid_m).to(tl.int64)
        slots = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + lanes)
    return expert, slots


_RUNTIME_INTS = ["num_slots", "top_k", "num_pid_m", "group_m"]  # no recompile per value


@triton.jit
def _gate_up_merged(a_ptrs, w_ptr, s_base, live, offs_k, pid_n, N, K, stride_wn, stride_wk, stride_sn, stride_sk,
                    up_scale_row, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, W_INT8: tl.constexpr, W_SCALE: tl.constexpr):
    """(acc_g, acc_u) [BLOCK_M, BLOCK_N] of _gate_up_kernel's K loop with the gate and up tiles as one operand:
    column j < BLOCK_N of the [BLOCK_K, 2 * BLOCK_N] tile is gate row n0 + j, column BLOCK_N + j up row N + n0 + j.
    With block scales each K-tile's product is scaled before it is added (one product a K-tile instead of two,
    so one wait on the tensor cores instead of two), the scales loaded one K-tile ahead."""
    j = tl.arange(0, 2 * BLOCK_N)
    is_up = j >= BLOCK_N
    col = (pid_n * BLOCK_N + tl.where(is_up, j - BLOCK_N, j)) % N  # past N: re-read valid rows, stores mask them
    w_rows = col.to(tl.int64) + tl.where(is_up, N, 0)
    w_ptrs = w_ptr + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
    num_k = tl.cdiv(K, BLOCK_K)
    if W_SCALE == 3:
        s_ptrs = s_base + tl.where(is_up, up_scale_row + col // 128, col // 128) * stride_sn
        s_next = tl.load(s_ptrs)
    for k in range(0, num_k):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            w = tl.load(w_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None], other=0.0)
        if W_INT8:
            w = w.to(a.dtype)
        if W_SCALE == 3:
            s = s_next
            s_next = tl.load(s_ptrs + (tl.minimum(k + 1, num_k - 1) * BLOCK_K) // 128 * stride_sk)
            acc += tl.dot(a, w, input_precision=PRECISION) * s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K * stride_wk
    return tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, topk_ids_ptr,
                    a_scale_ptr, w_scale_ptr, num_slots, top_k, num_pid_m, group_m, N, K, stride_xt, stride_we,
                    stride_wn, stride_wk, stride_hr, stride_se, stride_sn, stride_sk, up_scale_row,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NAIVE: tl.constexpr,
                    EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_INT8: tl.constexpr,
                    A_SCALE: tl.constexpr, W_SCALE: tl.constexpr, SWAP_AB: tl.constexpr = False,
                    MERGE_GU: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """h[rows, n-tile] = silu(A G^T) * (A U^T), A = x[slot // top_k] gathered; N = I, K = D.
    USE_TMA: w_ptr is a TMA descriptor over w13 viewed [E * 2N, K] with [BLOCK_N, BLOCK_K] boxes.
    Quantized (see the module docstring): W_INT8 converts weight tiles to x's dtype; A_SCALE multiplies row r by
    a_scale[token]; W_SCALE 1/2/3 = per expert / per channel / 128x128 block, the up rows' scales starting at
    scale row up_scale_row (N for channels, the gate's block-row count for blocks).
    SWAP_AB: the products computed transposed, W-tile [BLOCK_N, BLOCK_K] x A-tile^T (see swap_ab()).
    MERGE_GU (pointer loads, not SWAP_AB): the gate and up tiles as one [BLOCK_K, 2 * BLOCK_N] operand, one dot a
    K-tile (see merge_gate_up()); block scales of the next K-tile are loaded one iteration ahead."""
    gdc_prologue(USE_PDL)
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(N, BLOCK_N), group_m)
    if NAIVE:
        num_rows = num_pid_m * BLOCK_M
    else:
        num_rows = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_rows:  # past the padded rows of this routing
        return
    expert, slots = _rows(pid_m, sorted_ids_ptr, expert_ids_ptr, topk_ids_ptr, num_slots, BLOCK_M, NAIVE)
    live = slots < num_slots
    tokens = (slots // top_k).to(tl.int64)
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (offs_n % N).to(tl.int64)  # columns past N re-read valid rows; the store masks them
    a_ptrs = x_ptr + tokens[:, None] * stride_xt + offs_k[None, :]
    if USE_TMA:  # box rows past N fall on up rows or the next expert (or zero fill); the store masks them
        g_row = (expert * 2 * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        if SWAP_AB:  # [BLOCK_N, BLOCK_K] tiles
            g_ptrs = w_ptr + expert * stride_we + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
        else:  # [BLOCK_K, BLOCK_N]
            g_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + N * stride_wn
    if SWAP_AB:
        acc_g = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if W_SCALE > 0:
        s_base = w_scale_ptr + expert * stride_se
    if MERGE_GU:
        acc_g, acc_u = _gate_up_merged(a_ptrs, w_ptr + expert * stride_we, w_scale_ptr + expert * stride_se, live,
                                       offs_k, pid_n, N, K, stride_wn, stride_wk, stride_sn, stride_sk, up_scale_row,
                                       BLOCK_M, BLOCK_N, BLOCK_K, EVEN_K, PRECISION, W_INT8, W_SCALE)
    else:
        for k in range(0, tl.cdiv(K, BLOCK_K)):
            k_ok = offs_k < K - k * BLOCK_K
            if EVEN_K:
                a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
            else:
                a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
            if USE_TMA:
                g = w_ptr.load([g_row, k * BLOCK_K])
                u = w_ptr.load([g_row + N, k * BLOCK_K])
                if not SWAP_AB:
                    g = g.T
                    u = u.T
            elif EVEN_K:
                g = tl.load(g_ptrs)
                u = tl.load(u_ptrs)
            elif SWAP_AB:
                g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
                u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
            if W_INT8:
                g = g.to(a.dtype)
                u = u.to(a.dtype)
            if W_SCALE == 3:  # this K-tile lies in one 128-column block: scale its partial products per column
                kb = (k * BLOCK_K) // 128 * stride_sk
                sg = tl.load(s_base + (w_rows // 128) * stride_sn + kb)
                su = tl.load(s_base + (up_scale_row + w_rows // 128) * stride_sn + kb)
                if SWAP_AB:
                    acc_g += tl.dot(g, tl.trans(a), input_precision=PRECISION) * sg[:, None]
                    acc_u += tl.dot(u, tl.trans(a), input_precision=PRECISION) * su[:, None]
                else:
                    acc_g += tl.dot(a, g, input_precision=PRECISION) * sg[None, :]
                    acc_u += tl.dot(a, u, input_precision=PRECISION) * su[None, :]
            elif SWAP_AB:
                acc_g = tl.dot(g, tl.trans(a), acc_g, input_precision=PRECISION)
                acc_u = tl.dot(u, tl.trans(a), acc_u, input_precision=PRECISION)
            else:
                acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
                acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
            a_ptrs += BLOCK_K
            if not USE_TMA:
                g_ptrs += BLOCK_K * stride_wk
                u_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc_g = tl.trans(acc_g)
        acc_u = tl.trans(acc_u)
    if W_SCALE == 1:
        s = tl.load(s_base)
        acc_g *= s
        acc_u *= s
    elif W_SCALE == 2:
        acc_g *= tl.load(s_base + w_rows * stride_sn)[None, :]
        acc_u *= tl.load(s_base + (up_scale_row + w_rows) * stride_sn)[None, :]
    if A_SCALE:
        a_s = tl.load(a_scale_ptr + tokens, mask=live, other=0.0)[:, None]
        acc_g *= a_s
        acc_u *= a_s
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(h_ptr + rows[:, None] * stride_hr + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=offs_n[None, :] < N)


@triton.jit(do_not_specialize=_RUNTIME_INTS[:1] + _RUNTIME_INTS[2:])
def _down_kernel(h_ptr, w_ptr, y_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                 topk_ids_ptr, a_scale_ptr, w_scale_ptr, num_slots, num_pid_m, group_m, N, K, stride_hr, stride_we,
                 stride_wn, stride_wk, stride_ys, stride_se, stride_sn, stride_sk, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NAIVE: tl.constexpr, EVEN_K: tl.constexpr,
                 PRECISION: tl.constexpr, USE_TMA: tl.constexpr, W_INT8: tl.constexpr, A_SCALE: tl.constexpr,
                 W_SCALE: tl.constexpr, SWAP_AB: tl.constexpr = False, WARP_SPEC: tl.constexpr = False,
                 USE_PDL: tl.constexpr = False):
    """y[slot, n-tile] = w[slot] * (h[rows] W2^T); N = D, K = I.
    WARP_SPEC: the K loop warp-specialized by Triton (producer warps for the TMA loads; see warp_spec_down()).
    USE_TMA: h_ptr and w_ptr are TMA descriptors over h [P, K] ([BLOCK_M, BLOCK_K] boxes) and w2 viewed
    [E * N, K] ([BLOCK_N, BLOCK_K] boxes); zero fill past K replaces the masks.
    Quantized: as _gate_up_kernel, with a_scale per h row. SWAP_AB: as _gate_up_kernel."""
    gdc_prologue(USE_PDL)
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(N, BLOCK_N), group_m)
    if NAIVE:
        num_rows = num_pid_m * BLOCK_M
    else:
        num_rows = tl.load(num_padded_ptr)
    valid = pid_m * BLOCK_M < num_rows  # else past the padded rows of this routing
    if not WARP_SPEC:
        if not valid:
            return
    expert, slots = _rows(pid_m, sorted_ids_ptr, expert_ids_ptr, topk_ids_ptr, num_slots, BLOCK_M, NAIVE)
    num_k = tl.cdiv(K, BLOCK_K)
    if WARP_SPEC:  # an early return breaks Triton's warp specialization: past the padded rows, no K step, no store
        expert = tl.where(valid, expert, 0)
        slots = tl.where(valid, slots, num_slots)
        num_k = tl.where(valid, num_k, 0)
    live = slots < num_slots
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (offs_n % N).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    if USE_TMA:
        b_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        a_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :]
        if SWAP_AB:  # [BLOCK_N, BLOCK_K] tiles
            b_ptrs = w_ptr + expert * stride_we + w_rows[:, None] * stride_wn + offs_k[None, :] * stride_wk
        else:
            b_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    if W_SCALE > 0:
        s_base = w_scale_ptr + expert * stride_se
    if SWAP_AB:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in tl.range(0, num_k, warp_specialize=WARP_SPEC):
        k_ok = offs_k < K - k * BLOCK_K
        if USE_TMA:
            a = h_ptr.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = w_ptr.load([b_row, k * BLOCK_K])
            if not SWAP_AB:
                b = b.T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            if SWAP_AB:
                b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            else:
                b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        if W_INT8:
            b = b.to(a.dtype)
        if W_SCALE == 3:
            sb = tl.load(s_base + (w_rows // 128) * stride_sn + (k * BLOCK_K) // 128 * stride_sk)
            if SWAP_AB:
                acc += tl.dot(b, tl.trans(a), input_precision=PRECISION) * sb[:, None]
            else:
                acc += tl.dot(a, b, input_precision=PRECISION) * sb[None, :]
        elif SWAP_AB:
            acc = tl.dot(b, tl.trans(a), acc, input_precision=PRECISION)
        else:
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if not USE_TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
    if SWAP_AB:
        acc = tl.trans(acc)
    if W_SCALE == 1:
        acc *= tl.load(s_base)
    elif W_SCALE == 2:
        acc *= tl.load(s_base + w_rows * stride_sn)[None, :]
    weight = tl.load(topk_weights_ptr + slots, mask=live, other=0.0)
    if A_SCALE:
        weight *= tl.load(a_scale_ptr + rows)
    y = acc * weight[:, None]
    tl.store(y_ptr + slots.to(tl.int64)[:, None] * stride_ys + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n[None, :] < N))


def _check(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
           w2: torch.Tensor, quant: str | None = None) -> None:
    if x.dim() != 2 or w13.dim() != 3 or w2.dim() != 3 or topk_ids.dim() != 2:
        raise ValueError(f"fused_moe: want x [T, D], topk_ids [T, K], w13 [E, 2I, D], w2 [E, D, I]; got x "
                         f"{tuple(x.shape)}, topk_ids {tuple(topk_ids.shape)}, w13 {tuple(w13.shape)}, "
                         f"w2 {tuple(w2.shape)}")
    (T, D), (E, two_i, D13) = x.shape, w13.shape
    if D13 != D or two_i % 2 or tuple(w2.shape) != (E, D, two_i // 2):
        raise ValueError(f"fused_moe: w13 {tuple(w13.shape)} and w2 {tuple(w2.shape)} do not fit x [T, D={D}] "
                         f"(want w13 [E, 2I, D], w2 [E, D, I])")
    if topk_ids.shape[0] != T or tuple(topk_weights.shape) != tuple(topk_ids.shape):
        raise ValueError(f"fused_moe: topk_ids {tuple(topk_ids.shape)} and topk_weights "
                         f"{tuple(topk_weights.shape)} must both be [T={T}, K]")
    if topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"fused_moe: topk_ids must be int32/int64, got {topk_ids.dtype}")
    if quant is not None:
        if quant not in QUANT_FORMATS:
            raise ValueError(f"fused_moe: unknown quant format {quant!r}; available: {', '.join(QUANT_FORMATS)}")
        if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
            raise ValueError(f"fused_moe: x must be bf16/fp16/fp32, got {x.dtype}")
        if not (w13.dtype == w2.dtype == QUANT_FORMATS[quant][1]):
            raise ValueError(f"fused_moe: {quant} weights must be {QUANT_FORMATS[quant][1]}, got {w13.dtype}, "
                             f"{w2.dtype}")
    elif not (x.dtype == w13.dtype == w2.dtype) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise ValueError(f"fused_moe: x, w13, w2 must share one of bf16/fp16/fp32; got {x.dtype}, {w13.dtype}, "
                         f"{w2.dtype}")
    if len({t.device for t in (x, topk_ids, topk_weights, w13, w2)}) != 1:
        raise ValueError("fused_moe: all tensors must be on one device")
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
        raise ValueError("fused_moe: CPU tensors need the Triton interpreter (TRITON_INTERPRET=1 before import)")
    if x.stride(1) != 1:
        raise ValueError(f"fused_moe: x must have a contiguous last dim, strides {x.stride()}")


@functools.lru_cache(maxsize=8)
def _device_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def config_for(x: torch.Tensor, top_k: int, w13: torch.Tensor, quant: str | None = None) -> MoEConfig:
    """The tile config fused_moe uses for this x [T, D], top-k and w13 [E, 2I, D]; tuned files of a quantized
    format carry the format as their dtype (e.g. dtype=fp8_channel)."""
    (T, D), E, I = x.shape, w13.shape[0], w13.shape[1] // 2
    dtype = quant or str(x.dtype).removeprefix("torch.")
    name = _device_name(x.device.index or 0) if x.device.type == "cuda" else "cpu"
    return get_config(T, E, top_k, I, D, dtype, x.device.type, name)


class Routing(NamedTuple):
    """Row blocks of one layer call: the aligned routing, or in naive mode the flat topk_ids three times."""

    sorted_ids: torch.Tensor  # [P] int32 (naive: unused)
    expert_ids: torch.Tensor  # [P / block_m] int32 (naive: unused)
    num_padded: torch.Tensor  # [1] int32 (naive: unused)
    ids: torch.Tensor  # [T*K] topk_ids flattened
    top_k: int
    block_m: int
    num_pid_m: int  # row blocks in the grid (an upper bound unless naive)
    naive: bool


def route(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Routing:
    """topk_ids [T, K] -> Routing; naive blocks of NAIVE_BLOCK_M rows when use_naive_blocks says so."""
    T, K = topk_ids.shape
    ids = topk_ids.reshape(-1).contiguous()
    if use_naive_blocks(T, K, num_experts):
        return Routing(ids, ids, ids, ids, K, NAIVE_BLOCK_M, ids.numel(), True)
    return _sorted(moe_align(topk_ids, num_experts, block_m), ids, K, block_m)


def route_quant(topk_ids: torch.Tensor, num_experts: int, block_m: int, x: torch.Tensor
                ) -> tuple[Routing, torch.Tensor, torch.Tensor]:
    """route() plus x quantized per token (per_token_quant's values): by extra programs of the align launch, or
    at naive blocks (no align launch) by per_token_quant."""
    T, K = topk_ids.shape
    if use_naive_blocks(T, K, num_experts):
        return (route(topk_ids, num_experts, block_m), *per_token_quant(x))
    aligned, xq, xs = moe_align_quant(topk_ids, num_experts, block_m, x)
    return _sorted(aligned, topk_ids.reshape(-1).contiguous(), K, block_m), xq, xs


def _sorted(aligned, ids: torch.Tensor, top_k: int, block_m: int) -> Routing:
    return Routing(*aligned, ids, top_k, block_m, aligned.expert_ids.numel(), False)


def swap_ab(block_m: int, cfg: GemmConfig, dtype: torch.dtype) -> bool:
    """Compute an fp8 GEMM's products transposed (W-tile x A-tile^T) when its row blocks are narrower than 64:
    Triton gives Hopper's fp8 tensor-core instruction (wgmma) only to dots of >= 64 rows; narrower ones run on
    the older 16-row instruction, which has no fp8 form on Hopper, so every weight element is first converted
    to fp16 (docs/perf/moe_kernels.md, v5). Transposed, the weight tile's BLOCK_N >= 64 rows are the wide side."""
    return SWAP_AB_FP8 and dtype == torch.float8_e4m3fn and block_m < 64 and cfg.block_n >= 64


def merge_gate_up(w_scale: int, tma: bool, swap: bool) -> bool:
    """Run gate_up's gate and up tiles as one dot operand (_gate_up_merged) with 128x128 block scales: each
    K-tile's product must be scaled before it is added, so Triton waits for the tensor cores after every dot; one
    dot of twice the width halves those waits. Pointer loads only (two TMA boxes cannot form one operand) and not
    transposed (decode row blocks, where the weight stream, not the waits, sets the time)."""
    return MERGE_GU_BLOCK and w_scale == 3 and not tma and not swap


def warp_spec_down(tma: bool, num_warps: int, swap: bool) -> bool:
    """Let Triton warp-specialize the down GEMM's K loop (producer warps issuing the TMA loads while one consumer
    warpgroup runs the products). Triton 3.6 does so on sm_90 only where every tile comes by TMA and a program has
    4 warps; with pointer loads its pass fails, with 8 warps it leaves the loop as it is (docs/perf/moe_kernels.md,
    session 15). The down GEMM is the one whose both operands are TMA tiles (h rows in sorted order)."""
    return WARP_SPEC_DOWN and tma and num_warps == 4 and not swap


def _launch_args(r: Routing, cfg: GemmConfig, K: int, dtype: torch.dtype, tma: bool) -> dict:
    """dtype: the dot operands' dtype (fp32: exact "ieee" dots; fp8: the default precision)."""
    precision = "ieee" if dtype == torch.float32 else None if dtype == torch.float8_e4m3fn else "tf32"
    return dict(BLOCK_M=r.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NAIVE=r.naive,
                EVEN_K=K % cfg.block_k == 0, PRECISION=precision, USE_TMA=tma, num_warps=cfg.num_warps,
                num_stages=cfg.num_stages, SWAP_AB=swap_ab(r.block_m, cfg, dtype))


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA descriptors need Hopper or newer (or the interpreter), contiguous rows of 16-byte multiples."""
    if ts[0].device.type == "cuda" and torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all(t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


def _desc(t: torch.Tensor, rows: int, box: list[int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t.view(rows, t.shape[-1]), box)


class Quant(NamedTuple):
    """One GEMM's quantized weights: format (a QUANT_FORMATS key), weight scale S (float32, see
    moelab/layers/moe/quant.py) and, for fp8, the per-row activation scales of its A operand."""

    fmt: str
    w_scale: torch.Tensor
    a_scale: torch.Tensor | None = None


def _quant_args(w: torch.Tensor, q: Quant | None) -> tuple[list, dict]:
    """(positional scale args, constexpr flags) of a GEMM launch; w stands in for absent pointers."""
    if q is None:
        return [w, w, 0, 0, 0], dict(W_INT8=False, A_SCALE=False, W_SCALE=0)
    code, wdtype = QUANT_FORMATS[q.fmt]
    st = list(q.w_scale.stride()) + [0] * (3 - q.w_scale.dim())
    a_s = q.a_scale if q.a_scale is not None else q.w_scale
    return [a_s, q.w_scale, *st], dict(W_INT8=wdtype == torch.int8, A_SCALE=q.a_scale is not None, W_SCALE=code)


def gate_up(x: torch.Tensor, w13: torch.Tensor, r: Routing, cfg: GemmConfig, q: Quant | None = None,
            out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] -> h [num_pid_m * block_m, I]: silu(gate) * up per sorted row, in out_dtype
    (default x's). Quantized: x fp8 with q.a_scale [T] (W8A8) or x bf16/fp16/fp32 (int8 W8A16)."""
    (E, two_i, D), I = w13.shape, w13.shape[1] // 2
    h = torch.empty(r.num_pid_m * r.block_m, I, dtype=out_dtype or x.dtype, device=x.device)
    tma = cfg.tma and _tma_ok(w13)
    w = _desc(w13, E * two_i, [cfg.block_n, cfg.block_k]) if tma else w13
    qargs, qflags = _quant_args(w13, q)
    code = qflags["W_SCALE"]
    up_row = I if code == 2 else q.w_scale.shape[1] // 2 if code == 3 else 0  # scale row of the first up row
    largs = _launch_args(r, cfg, D, x.dtype, tma)
    _gate_up_kernel[(r.num_pid_m * triton.cdiv(I, cfg.block_n),)](
        x, w, h, r.sorted_ids, r.expert_ids, r.num_padded, r.ids, qargs[0], qargs[1], r.ids.numel(), r.top_k,
        r.num_pid_m, cfg.group_m, I, D, x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        *qargs[2:], up_row, **largs, **qflags, MERGE_GU=merge_gate_up(code, tma, largs["SWAP_AB"]),
        **launch_options(x.device))
    return h


def down(h: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, r: Routing, cfg: GemmConfig,
         q: Quant | None = None, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """h [P, I], w2 [E, D, I], topk_weights [T*K] float32 -> y [T*K, D]: router-weighted rows in slot order, in
    out_dtype (default h's). Quantized: h fp8 with q.a_scale [P] (W8A8) or h bf16/fp16/fp32 (int8 W8A16)."""
    E, D, I = w2.shape
    y = torch.empty(r.ids.numel(), D, dtype=out_dtype or h.dtype, device=h.device)
    tma = cfg.tma and _tma_ok(w2, h)
    a = _desc(h, h.shape[0], [r.block_m, cfg.block_k]) if tma else h
    w = _desc(w2, E * D, [cfg.block_n, cfg.block_k]) if tma else w2
    qargs, qflags = _quant_args(w2, q)
    largs = _launch_args(r, cfg, I, h.dtype, tma)
    _down_kernel[(r.num_pid_m * triton.cdiv(D, cfg.block_n),)](
        a, w, y, topk_weights, r.sorted_ids, r.expert_ids, r.num_padded, r.ids, qargs[0], qargs[1], r.ids.numel(),
        r.num_pid_m, cfg.group_m, D, I, h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        *qargs[2:], **largs, **qflags, WARP_SPEC=warp_spec_down(tma, cfg.num_warps, largs["SWAP_AB"]),
        **launch_options(h.device))
    return y


def _check_scales(quant: str, w13: torch.Tensor, w13_scale: torch.Tensor | None, w2_scale: torch.Tensor | None
                  ) -> None:
    (E, two_i, D), I, b = w13.shape, w13.shape[1] // 2, SCALE_BLOCK
    want = {1: ((E,), (E,)), 2: ((E, two_i), (E, D)),
            3: ((E, 2 * triton.cdiv(I, b), triton.cdiv(D, b)), (E, triton.cdiv(D, b), triton.cdiv(I, b)))}
    got = tuple(tuple(s.shape) if s is not None else None for s in (w13_scale, w2_scale))
    if got != want[QUANT_FORMATS[quant][0]] or any(s.dtype != torch.float32 for s in (w13_scale, w2_scale)):
        raise ValueError(f"fused_moe: {quant} wants float32 scales of shapes {want[QUANT_FORMATS[quant][0]]}, got "
                         f"{got} {[getattr(s, 'dtype', None) for s in (w13_scale, w2_scale)]}")


def quant_config(cfg: MoEConfig, quant: str | None) -> MoEConfig:
    """cfg with BLOCK_K capped at 128 for block scales (a K-tile must lie in one scale block)."""
    if quant != "fp8_block":
        return cfg
    return replace(cfg, gate_up=replace(cfg.gate_up, block_k=min(cfg.gate_up.block_k, SCALE_BLOCK)),
                   down=replace(cfg.down, block_k=min(cfg.down.block_k, SCALE_BLOCK)))


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, config: MoEConfig | None = None, quant: str | None = None,
              w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, sum_topk: bool = True,
              routing_settled: bool = False) -> torch.Tensor:
    """x [T, D], topk_ids [T, K], topk_weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]
    -> [T, D] in x's dtype: sum_k w[t,k] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])), e = topk_ids[t,k].
    quant: a QUANT_FORMATS key; then w13/w2 hold Q (fp8/int8) and W = Q * scale (shapes: module docstring).
    sum_topk=False: the [T*K, D] router-weighted rows (slot t*K + k) before the top-k sum, for a caller that
    sums them inside its next kernel (rms_norm.add_rms_norm(..., top_k=K)). One token on a GPU (bf16/fp16/fp32 or
    int8_channel weights, unit last strides) runs moe_gemv.py's GEMVs unless a config is given or the tuned
    table's entry says gemv false (its GEMMs timed faster at one token on this GPU); routing_settled
    (topk_ids written at least two launches before) lets them read the ids before their PDL wait."""
    _check(x, topk_ids, topk_weights, w13, w2, quant)
    if quant is not None:
        _check_scales(quant, w13, w13_scale, w2_scale)
    (T, D), K = x.shape, topk_ids.shape[1]
    if T * K == 0:
        return x.new_zeros(T if sum_topk else T * K, D)
    if config is None:
        config = config_for(x, K, w13, quant)
        if config.gemv and moe_gemv_applies(x, w13, quant, w2, (w13_scale, w2_scale)):  # one token: the experts
            # as matrix-vector products (moe_gemv.py), unless the tuned table timed its GEMMs faster; an explicit
            # tile config (tuning, benches) asks for the GEMMs
            return fused_moe_gemv(x, topk_ids, topk_weights, w13, w2, quant, w13_scale, w2_scale, sum_topk,
                                  routing_settled)
    cfg = quant_config(config, quant)
    weights = topk_weights.reshape(-1).contiguous().float()
    if quant is not None and QUANT_FORMATS[quant][1] == torch.float8_e4m3fn:
        return _fused_moe_w8a8(x, topk_ids, weights, w13, w2, cfg, quant, w13_scale, w2_scale, sum_topk)
    r = route(topk_ids, w13.shape[0], cfg.block_m)
    if quant is None:
        h = gate_up(x, w13, r, cfg.gate_up)
        y = down(h, w2, weights, r, cfg.down)  # [T*K, D]
    else:  # int8 W8A16
        h = gate_up(x, w13, r, cfg.gate_up, Quant(quant, w13_scale))
        y = down(h, w2, weights, r, cfg.down, Quant(quant, w2_scale))
    return y if K == 1 or not sum_topk else moe_sum(y, K)


def fused_moe_gemv(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, quant: str | None = None, w13_scale: torch.Tensor | None = None,
                   w2_scale: torch.Tensor | None = None, sum_topk: bool = True, routing_settled: bool = False
                   ) -> torch.Tensor:
    """fused_moe's one-token GEMV path (moe_gemv.py), for a caller that wants it whatever the table says (the
    tuner times it against the GEMMs)."""
    y = moe_gemv(x, topk_ids, topk_weights, w13, w2, quant=quant, w13_scale=w13_scale, w2_scale=w2_scale,
                 routing_settled=routing_settled)
    return y if topk_ids.shape[1] == 1 or not sum_topk else moe_sum(y, topk_ids.shape[1])


def set_act_quant(mode: str) -> None:
    """Where W8A8 layers quantize their activations: "fused" (default) or "separate" (module docstring; the
    values are the same, for A/B timings)."""
    global ACT_QUANT
    if mode not in ("fused", "separate"):
        raise ValueError(f"act_quant must be 'fused' or 'separate', got {mode!r}")
    ACT_QUANT = mode


def _fused_moe_w8a8(x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, cfg: MoEConfig, quant: str, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                    sum_topk: bool) -> torch.Tensor:
    """fp8 x and h with per-row scales; where x is quantized: ACT_QUANT (module docstring)."""
    E, K, act = w13.shape[0], topk_ids.shape[1], x.dtype
    if ACT_QUANT == "fused":
        r, xq, xs = route_quant(topk_ids, E, cfg.block_m, x)
    else:
        r = route(topk_ids, E, cfg.block_m)
        xq, xs = per_token_quant(x)
    h = gate_up(xq, w13, r, cfg.gate_up, Quant(quant, w13_scale, xs), out_dtype=act)
    hq, hs = per_token_quant(h, None if r.naive else r.num_padded)
    y = down(hq, w2, weights, r, cfg.down, Quant(quant, w2_scale, hs), out_dtype=act)
    return y if K == 1 or not sum_topk else moe_sum(y, K)


def fused_moe_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """Plain-torch twin of fused_moe, float32 throughout, one matmul per (token, slot) gathered weights."""
    T, K = topk_ids.shape
    I = w13.shape[1] // 2
    xs = x.float().repeat_interleave(K, dim=0)  # [T*K, D]
    ids = topk_ids.reshape(-1)
    gu = torch.einsum("sd,snd->sn", xs, w13[ids].float())  # [T*K, 2I]
    h = F.silu(gu[:, :I]) * gu[:, I:]
    y = torch.einsum("si,sdi->sd", h, w2[ids].float()) * topk_weights.reshape(-1, 1).float()
    return y.view(T, K, -1).sum(dim=1).to(x.dtype)
