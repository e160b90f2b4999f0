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


@triton.jit
def _rotary_kernel(x_ptr, y_ptr, pos_ptr, cos_ptr, sin_ptr, stride_xt, stride_xh, stride_yt, stride_yh,
                   num_heads, HALF: tl.constexpr, BLOCK_H: tl.constexpr, INTERLEAVED: tl.constexpr):
    t = tl.program_id(0)
    hb = tl.program_id(1)
    pos = tl.load(pos_ptr + t)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + i)
    s = tl.load(sin_ptr + pos * HALF + i)
    h = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    hm = (h < num_heads)[:, None]
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    xb = x_ptr + t * stride_xt + h[:, None] * stride_xh
    x1 = tl.load(xb + i1[None, :], mask=hm, other=0.0).to(tl.float32)
    x2 = tl.load(xb + i2[None, :], mask=hm, other=0.0).to(tl.float32)
    yb = y_ptr + t * stride_yt + h[:, None] * stride_yh
    tl.store(yb + i1[None, :], (x1 * c[None, :] - x2 * s[None, :]).to(y_ptr.dtype.element_ty), mask=hm)
    tl.store(yb + i2[None, :], (x2 * c[None, :] + x1 * s[None, :]).to(y_ptr.dtype.element_ty), mask=hm)


def _apply(x: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool) -> torch.Tensor:
    T, H, rot = x.shape
    half = rot // 2
    if rot % 2 or half & (half - 1):
        raise ValueError(f"rotary dim must be twice a power of two, got {rot}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    y = torch.empty((T, H, rot), dtype=x.dtype, device=x.device)
    if T:
        BLOCK_H = min(triton.next_power_of_2(H), 16)
        _rotary_kernel[(T, triton.cdiv(H, BLOCK_H))](x, y, positions, cos, sin, x.stride(0), x.stride(1),
                                                     y.stride(0), y.stride(1), H, HALF=half, BLOCK_H=BLOCK_H,
                                                     INTERLEAVED=interleaved)
    return y


def rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
           interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [T, Hq, rot], k [T, Hk, rot], positions [T] int, cos/sin [P, rot/2] float32 -> rotated (q, k)."""
    return _apply(q, positions, cos, sin, interleaved), _apply(k, positions, cos, sin, interleaved)


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
