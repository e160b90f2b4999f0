"""Rotary position embedding: the half-split (NeoX) layout and DeepSeek's interleaved pairs, with YaRN.

cos/sin are computed from positions on the fly in float32 (cheap next to the projections, and exact).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_softmax_scale_factor(scaling: dict[str, Any] | None) -> float:
    """DeepSeek multiplies its softmax scale by mscale(factor, mscale_all_dim)^2 under YaRN."""
    if not scaling or not scaling.get("mscale_all_dim"):
        return 1.0
    m = yarn_mscale(scaling["factor"], scaling["mscale_all_dim"])
    return m * m


def yarn_inv_freq(dim: int, base: float, scaling: dict[str, Any]) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071) inverse frequencies and the cos/sin attention factor."""
    factor = scaling["factor"]
    orig = scaling["original_max_position_embeddings"]
    beta_fast, beta_slow = scaling.get("beta_fast") or 32, scaling.get("beta_slow") or 1
    mscale, mscale_all = scaling.get("mscale"), scaling.get("mscale_all_dim")
    attn_factor = scaling.get("attention_factor")
    if attn_factor is None:
        attn_factor = yarn_mscale(factor, mscale) / yarn_mscale(factor, mscale_all) if mscale and mscale_all \
            else yarn_mscale(factor)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if scaling.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    extrapolate = 1 - ramp  # 1 = keep the original frequency
    inv_freq = (1.0 / (factor * pos_freqs)) * (1 - extrapolate) + (1.0 / pos_freqs) * extrapolate
    return inv_freq, float(attn_factor)


class RotaryEmbedding(nn.Module):
    def __init__(self, dim: int, base: float, scaling: dict[str, Any] | None = None,
                 interleaved: bool = False) -> None:
        super().__init__()
        self.dim, self.interleaved = dim, interleaved
        if scaling:
            inv_freq, self.attention_factor = yarn_inv_freq(dim, base, scaling)
        else:
            inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attention_factor = 1.0
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.cos: torch.Tensor | None = None  # [max_positions, dim/2] float32 tables of the "triton" path
        self.sin: torch.Tensor | None = None

    def build_tables(self, max_positions: int) -> None:
        """Switch to the one-kernel path over precomputed cos/sin tables (attention factor folded in)."""
        pos = torch.arange(max_positions, dtype=torch.float32, device=self.inv_freq.device)
        freqs = pos[:, None] * self.inv_freq.float()
        self.cos = (freqs.cos() * self.attention_factor).contiguous()
        self.sin = (freqs.sin() * self.attention_factor).contiguous()

    def _rotate(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        # x [T, heads, dim]; cos/sin [T, 1, dim/2]
        xf = x.float()
        if self.interleaved:
            x1, x2 = xf[..., 0::2], xf[..., 1::2]
            return torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2).to(x.dtype)
        x1, x2 = xf.chunk(2, dim=-1)
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cos is not None:
            from moelab.kernels.rotary import rotary

            return rotary(q, k, positions, self.cos, self.sin, self.interleaved)
        freqs = positions.float()[:, None] * self.inv_freq.to(positions.device)  # [T, dim/2]
        cos = (freqs.cos() * self.attention_factor)[:, None, :]
        sin = (freqs.sin() * self.attention_factor)[:, None, :]
        return self._rotate(q, cos, sin), self._rotate(k, cos, sin)
