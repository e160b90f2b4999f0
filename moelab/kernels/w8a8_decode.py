"""W8A8 experts at decode as matrix-vector products on the CUDA cores, activations quantized in registers.

At naive blocks (fused_moe_config.use_naive_blocks: one token's slots, or a few tokens on distinct experts) each
GEMM program of fused_moe.py has one live row. Its fp8 tensor-core instruction reads the activation tile from
shared memory, so x and h must be quantized in memory first: two per_token_quant launches, which at M=1 cost the
layer more than the fp8 weights save (docs/perf/moe_kernels.md, v5 and v6). Here every program reads its row
itself: one pass over the row for its largest |value|, then the K loop quantizes each chunk in registers (the scale
and values of per_token_quant), converts its fp8 weight tile to float32 and accumulates the products in float32.
A product of two e4m3 values is exact in float32, so this is the format's W8A8 arithmetic; only the order of the
float32 sums differs from the tensor cores'.

gate_up: h[s, n] = silu(sx * Sg[n] * sum_k G[e, n, k] xq[k]) * (sx * Su[n] * sum_k U[e, n, k] xq[k]), s = t*K + k
    (slot of expert e), xq = x[t] quantized with scale sx; block scales multiply each 128-column block's products.
down: y[s, n] = w[s] * sh[s] * S[n] * sum_k W2[e, n, k] hq[s, k], hq = h[s] quantized with scale sh[s].
Then moe_sum, as fused_moe.

Variants: `w8a8_decode_moe` (Triton), checked against fused_moe's tensor-core path and the naive backend's
dequantized oracle (tests/test_moe_quant.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moelab.kernels.moe_sum import moe_sum
from moelab.kernels.pdl import gdc_prologue, launch_options
from moelab.kernels.per_token_quant import FP8_MAX_C, MIN_SCALE_C, quant_block_k, quant_scale, quantize

SCALE_CODES = {"fp8_tensor": 1, "fp8_channel": 2, "fp8_block": 3}


class GemvConfig(NamedTuple):
    block_n: int  # output rows per program
    block_k: int  # columns per K step (<= 128 for block scales: one scale block per step)
    num_warps: int = 4


@triton.jit
def _row_scale(v_ptr, K, QBLOCK: tl.constexpr):
    """The per-token scale of the row at v_ptr (K values): per_token_quant's."""
    offs = tl.arange(0, QBLOCK)
    amax = tl.zeros((QBLOCK,), dtype=tl.float32)
    for k in range(0, K, QBLOCK):
        amax = tl.maximum(amax, tl.abs(tl.load(v_ptr + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)))
    return quant_scale(tl.max(amax, axis=0), FP8_MAX_C, MIN_SCALE_C)


@triton.jit
def _weight_tile(w_ptrs, s_ptrs, stride_sk, k, k_ok, BLOCK_SCALES: tl.constexpr):
    """The weight tile at column k in float32 (w_ptrs: the tile at k = 0, unit stride along K); BLOCK_SCALES: times
    the rows' scales of k's 128-column block (s_ptrs: the rows' scales of block 0)."""
    w = tl.load(w_ptrs + k, mask=k_ok[None, :], other=0.0).to(tl.float32)
    if BLOCK_SCALES:
        w = w * tl.load(s_ptrs + (k // 128) * stride_sk)[:, None]
    return w


@triton.jit(do_not_specialize=["top_k"])
def _gate_up_gemv_kernel(x_ptr, w_ptr, h_ptr, ids_ptr, w_scale_ptr, top_k, N, K, stride_xt, stride_we, stride_wn,
                         stride_hs, stride_se, stride_sn, stride_sk, up_scale_row, W_SCALE: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                         USE_PDL: tl.constexpr = False):
    """Program (slot s, n-tile): h[s, n-tile]; N = I, K = D; w13 [E, 2N, K] fp8 with unit stride along K."""
    gdc_prologue(USE_PDL)
    s = tl.program_id(0)
    t = (s // top_k).to(tl.int64)
    e = tl.load(ids_ptr + s).to(tl.int64)
    x_row = x_ptr + t * stride_xt
    sx = _row_scale(x_row, K, QBLOCK)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)  # past N: valid rows re-read, the store masks them
    g_ptrs = w_ptr + e * stride_we + rows[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    s_base = w_scale_ptr + e * stride_se
    sg_ptrs = s_base + (rows // 128) * stride_sn
    su_ptrs = s_base + (up_scale_row + rows // 128) * stride_sn
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = k + offs_k < K
        xq = quantize(tl.load(x_row + k + offs_k, mask=k_ok, other=0.0), sx, FP8_MAX_C)[None, :]
        acc_g += _weight_tile(g_ptrs, sg_ptrs, stride_sk, k, k_ok, W_SCALE == 3) * xq
        acc_u += _weight_tile(g_ptrs + N * stride_wn, su_ptrs, stride_sk, k, k_ok, W_SCALE == 3) * xq
    gate = tl.sum(acc_g, axis=1) * sx
    up = tl.sum(acc_u, axis=1) * sx
    if W_SCALE == 1:
        sw = tl.load(s_base)
        gate *= sw
        up *= sw
    elif W_SCALE == 2:
        gate *= tl.load(s_base + rows * stride_sn)
        up *= tl.load(s_base + (up_scale_row + rows) * stride_sn)
    h = gate / (1.0 + tl.exp(-gate)) * up
    tl.store(h_ptr + s.to(tl.int64) * stride_hs + offs_n, h.to(h_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _down_gemv_kernel(h_ptr, w_ptr, y_ptr, ids_ptr, topk_weights_ptr, w_scale_ptr, N, K, stride_hs, stride_we,
                      stride_wn, stride_ys, stride_se, stride_sn, stride_sk, W_SCALE: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, QBLOCK: tl.constexpr,
                      USE_PDL: tl.constexpr = False):
    """Program (slot s, n-tile): y[s, n-tile] = w[s] * (hq[s] W2[e]^T) * scales; N = D, K = I."""
    gdc_prologue(USE_PDL)
    s = tl.program_id(0).to(tl.int64)
    e = tl.load(ids_ptr + s).to(tl.int64)
    h_row = h_ptr + s * stride_hs
    sh = _row_scale(h_row, K, QBLOCK)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = (offs_n % N).to(tl.int64)
    w_ptrs = w_ptr + e * stride_we + rows[:, None] * stride_wn + tl.arange(0, BLOCK_K)[None, :]
    s_base = w_scale_ptr + e * stride_se
    s_ptrs = s_base + (rows // 128) * stride_sn
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        k_ok = k + offs_k < K
        hq = quantize(tl.load(h_row + k + offs_k, mask=k_ok, other=0.0), sh, FP8_MAX_C)[None, :]
        acc += _weight_tile(w_ptrs, s_ptrs, stride_sk, k, k_ok, W_SCALE == 3) * hq
    y = tl.sum(acc, axis=1) * (sh * tl.load(topk_weights_ptr + s))
    if W_SCALE == 1:
        y *= tl.load(s_base)
    elif W_SCALE == 2:
        y *= tl.load(s_base + rows * stride_sn)
    tl.store(y_ptr + s * stride_ys + offs_n, y.to(y_ptr.dtype.element_ty), mask=offs_n < N)


def gemv_config(N: int, K: int, block_scales: bool) -> GemvConfig:
    """Tiles for one GEMV launch of N output rows over K columns (see docs/perf/moe_kernels.md, v7)."""
    block_k = 128 if block_scales else min(256, triton.next_power_of_2(max(K, 16)))
    return GemvConfig(block_n=16, block_k=min(block_k, triton.next_power_of_2(max(K, 16))))


def _strides(s: torch.Tensor) -> list[int]:
    return list(s.stride()) + [0] * (3 - s.dim())


def w8a8_decode_moe(x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                    w2: torch.Tensor, quant: str, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                    sum_topk: bool = True, configs: tuple[GemvConfig, GemvConfig] | None = None) -> torch.Tensor:
    """x [T, D] (bf16/fp16/fp32), topk_ids [T, K] (a token's experts distinct), weights [T*K] float32, w13 [E, 2I, D]
    and w2 [E, D, I] fp8 (contiguous) with their QUANT_FORMATS scales -> [T, D] in x's dtype (sum_topk=False: the
    [T*K, D] router-weighted rows). Shapes and dtypes are fused_moe's to check; configs: (gate_up, down) tiles."""
    if quant not in SCALE_CODES:
        raise ValueError(f"w8a8_decode_moe: want one of {', '.join(SCALE_CODES)}, got {quant!r}")
    if not (w13.is_contiguous() and w2.is_contiguous()):
        raise ValueError("w8a8_decode_moe: w13 and w2 must be contiguous")
    (T, D), K, I, code = x.shape, topk_ids.shape[1], w13.shape[1] // 2, SCALE_CODES[quant]
    ids = topk_ids.reshape(-1).contiguous()
    cfg_gu, cfg_dn = configs or (gemv_config(I, D, code == 3), gemv_config(D, I, code == 3))
    if code == 3 and (cfg_gu.block_k > 128 or cfg_dn.block_k > 128):
        raise ValueError("w8a8_decode_moe: block scales need block_k <= 128")
    h = torch.empty(T * K, I, dtype=x.dtype, device=x.device)
    up_row = I if code == 2 else w13_scale.shape[1] // 2 if code == 3 else 0
    opts = launch_options(x.device)
    _gate_up_gemv_kernel[(T * K, triton.cdiv(I, cfg_gu.block_n))](
        x, w13, h, ids, w13_scale, K, I, D, x.stride(0), w13.stride(0), w13.stride(1), h.stride(0),
        *_strides(w13_scale), up_row, W_SCALE=code, BLOCK_N=cfg_gu.block_n, BLOCK_K=cfg_gu.block_k,
        QBLOCK=quant_block_k(D), num_warps=cfg_gu.num_warps, **opts)
    y = torch.empty(T * K, D, dtype=x.dtype, device=x.device)
    _down_gemv_kernel[(T * K, triton.cdiv(D, cfg_dn.block_n))](
        h, w2, y, ids, weights, w2_scale, D, I, h.stride(0), w2.stride(0), w2.stride(1), y.stride(0),
        *_strides(w2_scale), W_SCALE=code, BLOCK_N=cfg_dn.block_n, BLOCK_K=cfg_dn.block_k, QBLOCK=quant_block_k(I),
        num_warps=cfg_dn.num_warps, **opts)
    return y if K == 1 or not sum_topk else moe_sum(y, K)
