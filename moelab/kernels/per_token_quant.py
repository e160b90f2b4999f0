"""Dynamic per-token fp8 quantization of activations (the A side of the W8A8 MoE GEMMs).

x [T, K] -> (q [T, K] fp8 e4m3fn, s [T] float32) with s[t] = max(max|x[t]|, 448 * 1e-12) / 448 and
q[t] = fp8(clamp(x[t] / s[t], -448, 448)), so x[t] ~= q[t] * s[t]. One program per row; no host sync.
Variants: `per_token_quant` (Triton), `per_token_quant_ref` (torch).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

FP8_MAX = 448.0
MIN_SCALE = 1e-12
FP8_MAX_C = tl.constexpr(FP8_MAX)  # the same, for other kernels' jit code
MIN_SCALE_C = tl.constexpr(MIN_SCALE)


@triton.jit
def _round_e4m3(v):
    """v (float32, |v| <= 448) rounded to the nearest e4m3 value (ties to even), still float32, so that the cast
    to fp8 that follows is exact. (The Triton interpreter's own fp32 -> fp8 cast drops the carry into the
    exponent, e.g. 126.8 -> 64; the GPU's is right, and this gives the same values on both.)"""
    b = v.to(tl.uint32, bitcast=True)
    b = (b + 0x7FFFF + ((b >> 20) & 1)) & 0xFFF00000  # normals: keep 3 of the 23 mantissa bits, ties to even
    normal = b.to(tl.float32, bitcast=True)
    sub = (v + 24576.0) - 24576.0  # |v| < 2^-6: e4m3 subnormals, a fixed step 2^-9 (the ulp of 24576 in fp32)
    return tl.where(tl.abs(v) < 0.015625, sub, normal)


@triton.jit
def quant_scale(amax, FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr):
    """The per-row scale of a row whose largest |value| is amax (float32)."""
    return tl.maximum(amax / FP8_MAX_, MIN_SCALE_)


@triton.jit
def quantize(v, s, FP8_MAX_: tl.constexpr):
    """v / s clamped to the e4m3 range and rounded to it (float32 values, exact in fp8); s broadcasts over v."""
    return _round_e4m3(tl.clamp(v.to(tl.float32) / s, -FP8_MAX_, FP8_MAX_))


@triton.jit
def quant_row(x_ptr, q_ptr, s_ptr, t, K, stride_x, stride_q, FP8_MAX_: tl.constexpr, MIN_SCALE_: tl.constexpr,
              BLOCK_K: tl.constexpr):
    """Row t: amax over K in BLOCK_K chunks, then a second pass over the row quantizes it; writes q[t], s[t]. The
    first chunk stays in registers between the two passes (a row of one chunk is read once)."""
    offs = tl.arange(0, BLOCK_K)
    x_row = x_ptr + t * stride_x
    first = tl.load(x_row + offs, mask=offs < K, other=0.0)
    amax = tl.abs(first.to(tl.float32))
    for k in range(BLOCK_K, K, BLOCK_K):
        v = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0).to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s = quant_scale(tl.max(amax, axis=0), FP8_MAX_, MIN_SCALE_)
    q_row = q_ptr + t * stride_q
    tl.store(q_row + offs, quantize(first, s, FP8_MAX_).to(q_ptr.dtype.element_ty), mask=offs < K)
    for k in range(BLOCK_K, K, BLOCK_K):
        v = tl.load(x_row + k + offs, mask=k + offs < K, other=0.0)
        tl.store(q_row + k + offs, quantize(v, s, FP8_MAX_).to(q_ptr.dtype.element_ty), mask=k + offs < K)
    tl.store(s_ptr + t, s)


@triton.jit
def _per_token_quant_kernel(x_ptr, q_ptr, s_ptr, num_rows_ptr, K, stride_x, stride_q, FP8_MAX_: tl.constexpr,
                            MIN_SCALE_: tl.constexpr, BLOCK_K: tl.constexpr, HAS_NUM_ROWS: tl.constexpr,
                            USE_PDL: tl.constexpr = False):
    """One program per row (quant_row). HAS_NUM_ROWS: rows at or past num_rows_ptr[0] are skipped (the MoE's
    padded rows not in use this step)."""
    gdc_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    if HAS_NUM_ROWS:
        if t >= tl.load(num_rows_ptr):
            return
    quant_row(x_ptr, q_ptr, s_ptr, t, K, stride_x, stride_q, FP8_MAX_, MIN_SCALE_, BLOCK_K)


def quant_block_k(K: int) -> int:
    """The chunk quant_row walks a row of K values in."""
    return min(4096, triton.next_power_of_2(max(K, 16)))


def per_token_quant(x: torch.Tensor, num_rows: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [T, K] (bf16/fp16/fp32, unit stride along K) -> (q [T, K] float8_e4m3fn, s [T] float32).
    num_rows: optional [1] int32 on the device; rows from num_rows[0] on are left unwritten."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"per_token_quant: want x [T, K] with a contiguous last dim, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    T, K = x.shape
    q = torch.empty(T, K, dtype=torch.float8_e4m3fn, device=x.device)
    s = torch.empty(T, dtype=torch.float32, device=x.device)
    if T:
        block_k = quant_block_k(K)
        _per_token_quant_kernel[(T,)](x, q, s, s if num_rows is None else num_rows, K, x.stride(0), q.stride(0),
                                      FP8_MAX_=FP8_MAX, MIN_SCALE_=MIN_SCALE, BLOCK_K=block_k,
                                      HAS_NUM_ROWS=num_rows is not None, num_warps=4 if block_k <= 2048 else 8,
                                      **launch_options(x.device))
    return q, s


def per_token_quant_ref(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xf = x.float()
    s = (xf.abs().amax(dim=-1) / FP8_MAX).clamp_min(MIN_SCALE)
    return (xf / s[:, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn), s
