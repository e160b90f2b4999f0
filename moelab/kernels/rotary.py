"""Rotary position embedding applied to q and k in one Triton kernel, with `rotary_ref` beside it.

cos/sin come from a table [max_positions, rot/2] (float32, already multiplied by the attention factor) indexed
by each token's position. NeoX layout rotates the pairs (i, i + rot/2); the interleaved layout (DeepSeek)
rotates (2i, 2i + 1). q [T, Hq, rot] and k [T, Hk, rot] (any token and head strides, unit last stride) are
read, rotated in float32 and returned as new tensors in their dtype.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, qo_ptr, ko_ptr, pos_ptr, cos_ptr, sin_ptr, sq_t, sq_h, sk_t, sk_h, sqo_t, sqo_h,
                   sko_t, sko_h, num_q_heads, num_k_heads, NQB, HALF: tl.constexpr, BLOCK_H: tl.constexpr,
                   INTERLEAVED: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Program (t, hb): token t, head block hb of q (hb < NQB) or of k (hb - NQB): one launch for both."""
    gdc_prologue(USE_PDL)
    t = tl.program_id(0)
    hb = tl.program_id(1)
    if hb < NQB:
        x_ptr, y_ptr, sx_t, sx_h, sy_t, sy_h, nh = q_ptr, qo_ptr, sq_t, sq_h, sqo_t, sqo_h, num_q_heads
    else:
        hb = hb - NQB
        x_ptr, y_ptr, sx_t, sx_h, sy_t, sy_h, nh = k_ptr, ko_ptr, sk_t, sk_h, sko_t, sko_h, num_k_heads
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + i)
    s = tl.load(sin_ptr + pos * HALF + i)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = (h < nh)[:, None]
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    xb = x_ptr + t * sx_t + h[:, None] * sx_h
    x1 = tl.load(xb + i1[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(xb + i2[None, :], mask=hm, other=0.0).to(tl.float32)
    yb = y_ptr + t * sy_t + h[:, None] * sy_h
    tl.store(yb + i1[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(y_ptr.dtype.element_ty), mask=hm)
    tl.store(yb + i2[None, :], (x2 * c[None, :] + x1 * s[None, :]).to(y_ptr.dtype.element_ty), mask=hm)


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, rot], k [T, Hk, rot], positions [T] int, cos/sin [P, rot/2] float32 -> rotated (q, k), one launch."""
    T, Hq, rot = q.shape
    half = rot // 2
    if rot % 2 or half & (half - 1):
        raise ValueError(f"rotary dim must be twice a power of two, got {rot}")
    if k.shape[0] != T or k.shape[2] != rot or k.dtype != q.dtype:
        raise ValueError(f"k must be [{T}, Hk, {rot}] in {q.dtype}, got {tuple(k.shape)} {k.dtype}")
    if q.stride(-1) != 1:
        q = q.contiguous()
    if k.stride(-1) != 1:
        k = k.contiguous()
    Hk = k.shape[1]
    qo = torch.empty((T, Hq, rot), dtype=q.dtype, device=q.device)
    ko = torch.empty((T, Hk, rot), dtype=k.dtype, device=k.device)
    if T:
        BLOCK_H = min(triton.next_power_of_2(max(Hq, Hk)), 16)
        nqb = triton.cdiv(Hq, BLOCK_H)
        _rotary_kernel[(T, nqb + triton.cdiv(Hk, BLOCK_H))](
            q, k, qo, ko, positions, cos, sin, q.stride(0), q.stride(1), k.stride(0), k.stride(1), qo.stride(0),
            qo.stride(1), ko.stride(0), ko.stride(1), Hq, Hk, nqb, HALF=half, BLOCK_H=BLOCK_H,
            INTERLEAVED=interleaved, **launch_options(q.device))
    return qo, ko


def rotary_ref(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    c, s = cos[positions][:, None, :], sin[positions][:, None, :]

    def rot(x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        if interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).flatten(-2).to(x.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1).to(x.dtype)

    return rot(q), rot(k)
