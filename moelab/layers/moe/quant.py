"""Quantized expert weights: the formats, their scales, and in-memory conversion from bf16/fp32 and back.

A weight W [E, N, K] (w13: N = 2I, K = D; w2: N = D, K = I) is stored as Q (fp8 e4m3fn or int8) and a float32
scale S with W ~= Q * S (S multiplies; DeepSeek calls it `weight_scale_inv`):

| format | Q | S shape | activations |
|---|---|---|---|
| fp8_tensor | fp8 e4m3fn | [E] | fp8, dynamic per token (W8A8) |
| fp8_channel | fp8 e4m3fn | [E, N] | fp8, dynamic per token (W8A8) |
| fp8_block | fp8 e4m3fn | [E, nb(N), ceil(K/128)], 128x128 blocks | fp8, dynamic per token (W8A8) |
| int8_channel | int8, symmetric [-127, 127] | [E, N] | unchanged (W8A16) |

Block rows of w13 follow the checkpoint's tensors: gate rows and up rows are blocked separately, so
nb(2I) = 2 * ceil(I/128) (gate blocks, then up blocks); w2 has nb(D) = ceil(D/128). Dynamic per-token activation
quantization: s[t] = max(|x[t]|) / 448, x_q[t] = fp8(x[t] / s[t]); the GEMM result is rescaled by s[t] * S.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

import torch

QuantFormat = Literal["fp8_tensor", "fp8_channel", "fp8_block", "int8_channel"]
FORMATS: tuple[str, ...] = get_args(QuantFormat)
BLOCK = 128  # DeepSeek-style weight block: 128 rows x 128 columns
FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
INT8_MAX = 127.0
MIN_SCALE = 1e-12  # an all-zero row / block / tensor gets this scale (Q = 0) instead of a division by zero


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; available: {', '.join(FORMATS)}")


def is_w8a8(fmt: str) -> bool:
    """fp8 formats quantize the activations too (dynamic per token); int8_channel is weight-only."""
    return fmt.startswith("fp8")


def qdtype(fmt: str) -> torch.dtype:
    return FP8_DTYPE if is_w8a8(fmt) else torch.int8


def num_row_blocks(rows: int, halves: int = 1) -> int:
    """Block rows of a weight with `rows` rows made of `halves` separately blocked parts (w13: 2, w2: 1)."""
    return halves * math.ceil(rows // halves / BLOCK)


@dataclass(frozen=True)
class QuantScales:
    """Scales of one layer's quantized experts (float32, on the weights' device); see the module table.

    w13_scale: [E] | [E, 2I] | [E, 2*ceil(I/128), ceil(D/128)];  w2_scale: [E] | [E, D] | [E, ceil(D/128),
    ceil(I/128)] for fp8_tensor | *_channel | fp8_block. activation: how the backend quantizes x and h."""

    format: QuantFormat
    w13_scale: torch.Tensor
    w2_scale: torch.Tensor

    def __post_init__(self) -> None:
        check_format(self.format)
        for name in ("w13_scale", "w2_scale"):
            s = getattr(self, name)
            if not isinstance(s, torch.Tensor) or s.dtype != torch.float32:
                raise ValueError(f"QuantScales.{name} must be a float32 tensor, got {getattr(s, 'dtype', type(s))}")

    @property
    def activation(self) -> str:
        return "dynamic per-token fp8" if is_w8a8(self.format) else "none (weight-only)"

    def expected_shapes(self, E: int, D: int, I: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        if self.format == "fp8_tensor":
            return (E,), (E,)
        if self.format == "fp8_block":
            return (E, num_row_blocks(2 * I, 2), math.ceil(D / BLOCK)), (E, math.ceil(D / BLOCK), math.ceil(I / BLOCK))
        return (E, 2 * I), (E, D)

    def check(self, w13: torch.Tensor, w2: torch.Tensor) -> None:
        """Raise ValueError unless w13 [E, 2I, D], w2 [E, D, I] have this format's dtype and scale shapes."""
        E, two_i, D = w13.shape
        if w13.dtype != qdtype(self.format) or w2.dtype != qdtype(self.format):
            raise ValueError(f"{self.format}: weights must be {qdtype(self.format)}, got {w13.dtype}, {w2.dtype}")
        want13, want2 = self.expected_shapes(E, D, two_i // 2)
        if tuple(self.w13_scale.shape) != want13 or tuple(self.w2_scale.shape) != want2:
            raise ValueError(f"{self.format}: scales {tuple(self.w13_scale.shape)}, {tuple(self.w2_scale.shape)} do "
                             f"not fit w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)} (want {want13}, {want2})")


def _blocked_amax(w: torch.Tensor, halves: int) -> torch.Tensor:
    """w [E, N, K] -> max |w| per 128x128 block [E, halves * ceil(N/halves/128), ceil(K/128)]."""
    E, N, K = w.shape
    parts = w.float().abs().view(E, halves, N // halves, K)
    n, k = math.ceil(N // halves / BLOCK), math.ceil(K / BLOCK)
    padded = parts.new_zeros(E, halves, n * BLOCK, k * BLOCK)
    padded[:, :, :N // halves, :K] = parts
    return padded.view(E, halves, n, BLOCK, k, BLOCK).amax(dim=(3, 5)).reshape(E, halves * n, k)


def expand_scale(scale: torch.Tensor, fmt: str, N: int, K: int, halves: int = 1) -> torch.Tensor:
    """The scale of every element: [E, N, K] (or broadcastable to it) from any format's scale."""
    if fmt == "fp8_tensor":
        return scale[:, None, None]
    if fmt != "fp8_block":
        return scale[:, :, None]
    E = scale.shape[0]
    per_half = scale.view(E, halves, -1, scale.shape[-1]).repeat_interleave(BLOCK, 2).repeat_interleave(BLOCK, 3)
    return per_half[:, :, :N // halves, :K].reshape(E, N, K)


def quantize_weight(w: torch.Tensor, fmt: str, halves: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """w [E, N, K] (any float dtype) -> (q [E, N, K] fp8/int8, scale float32) of format fmt; see the module table.
    halves: 2 for w13, whose gate and up rows are blocked separately (fp8_block)."""
    check_format(fmt)
    if w.dim() != 3 or not w.is_floating_point():
        raise ValueError(f"quantize_weight: want a float [E, N, K] tensor, got {tuple(w.shape)} {w.dtype}")
    if w.shape[1] % halves:
        raise ValueError(f"quantize_weight: {w.shape[1]} rows do not split into {halves} halves")
    E, N, K = w.shape
    wf = w.float()
    if fmt == "fp8_tensor":
        amax = wf.abs().amax(dim=(1, 2))
    elif fmt == "fp8_block":
        amax = _blocked_amax(wf, halves)
    else:
        amax = wf.abs().amax(dim=2)
    qmax = FP8_MAX if is_w8a8(fmt) else INT8_MAX
    scale = (amax / qmax).clamp_min(MIN_SCALE)
    scaled = wf / expand_scale(scale, fmt, N, K, halves)
    q = scaled.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE) if is_w8a8(fmt) else scaled.round().clamp(-127, 127).to(
        torch.int8)
    return q, scale


def dequantize_weight(q: torch.Tensor, scale: torch.Tensor, fmt: str, halves: int = 1) -> torch.Tensor:
    """(q [E, N, K], scale) -> float32 [E, N, K] = q * scale."""
    check_format(fmt)
    return q.float() * expand_scale(scale, fmt, q.shape[1], q.shape[2], halves)


def quantize_experts(w13: torch.Tensor, w2: torch.Tensor, fmt: QuantFormat
                     ) -> tuple[torch.Tensor, torch.Tensor, QuantScales]:
    """w13 [E, 2I, D], w2 [E, D, I] (bf16/fp16/fp32) -> (q_w13, q_w2, QuantScales) of format fmt."""
    check_format(fmt)
    if w13.dim() != 3 or w2.dim() != 3 or w13.shape[1] % 2 or tuple(w2.shape) != (
            w13.shape[0], w13.shape[2], w13.shape[1] // 2):
        raise ValueError(f"quantize_experts: want w13 [E, 2I, D], w2 [E, D, I]; got {tuple(w13.shape)}, "
                         f"{tuple(w2.shape)}")
    q13, s13 = quantize_weight(w13, fmt, halves=2)
    q2, s2 = quantize_weight(w2, fmt)
    return q13, q2, QuantScales(fmt, s13, s2)


def dequantize(q_w13: torch.Tensor, q_w2: torch.Tensor, scales: QuantScales) -> tuple[torch.Tensor, torch.Tensor]:
    """(q_w13, q_w2, scales) -> float32 (w13 [E, 2I, D], w2 [E, D, I])."""
    scales.check(q_w13, q_w2)
    return (dequantize_weight(q_w13, scales.w13_scale, scales.format, halves=2),
            dequantize_weight(q_w2, scales.w2_scale, scales.format))


def fake_quant_per_token(x: torch.Tensor) -> torch.Tensor:
    """x [T, K] -> float32 [T, K]: the values the fp8 GEMMs see, fp8(x[t] / s[t]) * s[t], s[t] = max|x[t]| / 448
    (the dynamic per-token activation quantization of the W8A8 formats, in torch)."""
    xf = x.float()
    s = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(MIN_SCALE)  # [T, 1]
    return (xf / s).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE).float() * s
