"""Elementwise tails of the dense MLPs in one Triton kernel each, with plain-torch twins (`*_ref`) that are the
eager expressions they replace. The kernels round to the activation dtype where eager does, so they agree with it up
to the last-place differences of exp between Triton and torch.

- silu_mul(gu): silu(gate) * up of a fused gate/up projection [T, 2I] -> [T, I] (eager: two kernels and a
  [T, I] temporary).
- add_gated(routed, shared, gate): routed + sigmoid(gate) * shared, Qwen2-MoE's shared-expert mix, gate [T, 1]
  (eager: three kernels).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

BLOCK = 1024


@triton.jit
def _silu_mul_kernel(gu_ptr, out_ptr, I, stride_gu, stride_out, BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < I
    g = tl.load(gu_ptr + t * stride_gu + c, mask=m, other=0.0)
    u = tl.load(gu_ptr + t * stride_gu + I + c, mask=m, other=0.0)
    gf = g.to(tl.float32)
    s = (gf / (1.0 + tl.exp(-gf))).to(g.dtype)  # eager F.silu rounds here
    tl.store(out_ptr + t * stride_out + c, (s.to(tl.float32) * u.to(tl.float32)).to(out_ptr.dtype.element_ty), mask=m)


@triton.jit
def _add_gated_kernel(r_ptr, s_ptr, g_ptr, out_ptr, D, stride_r, stride_s, stride_g, stride_out,
                      BLOCK: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    c = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    m = c < D
    r = tl.load(r_ptr + t * stride_r + c, mask=m, other=0.0)
    sh = tl.load(s_ptr + t * stride_s + c, mask=m, other=0.0)
    gf = tl.load(g_ptr + t * stride_g).to(tl.float32)
    sig = (1.0 / (1.0 + tl.exp(-gf))).to(r.dtype)  # eager: sigmoid(gate), prod, sum each rounded
    prod = (sig.to(tl.float32) * sh.to(tl.float32)).to(r.dtype)
    tl.store(out_ptr + t * stride_out + c, (r.to(tl.float32) + prod.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=m)


def _rows(x: torch.Tensor, name: str) -> None:
    if x.dim() != 2 or x.stride(-1) != 1:
        raise ValueError(f"{name} must be [rows, cols] with a unit last stride, got {tuple(x.shape)} {x.stride()}")


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """gu [T, 2I] (gate columns, then up columns) -> silu(gate) * up [T, I] in gu's dtype."""
    _rows(gu, "gu")
    T, two_i = gu.shape
    if two_i % 2:
        raise ValueError(f"gu must have an even number of columns (gate then up), got {two_i}")
    out = torch.empty(T, two_i // 2, dtype=gu.dtype, device=gu.device)
    if T:
        _silu_mul_kernel[(T, triton.cdiv(two_i // 2, BLOCK))](gu, out, two_i // 2, gu.stride(0), out.stride(0),
                                                             BLOCK=BLOCK, num_warps=4, **launch_options(gu.device))
    return out


def silu_mul_ref(gu: torch.Tensor) -> torch.Tensor:
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def add_gated(routed: torch.Tensor, shared: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """routed, shared [T, D], gate [T, 1] logits (all one dtype) -> routed + sigmoid(gate) * shared."""
    for name, x in (("routed", routed), ("shared", shared)):
        _rows(x, name)
    T, D = routed.shape
    if shared.shape != routed.shape or gate.shape != (T, 1) or not routed.dtype == shared.dtype == gate.dtype:
        raise ValueError(f"want routed and shared [T, D] and gate [T, 1] of one dtype, got {tuple(routed.shape)} "
                         f"{routed.dtype}, {tuple(shared.shape)} {shared.dtype}, {tuple(gate.shape)} {gate.dtype}")
    out = torch.empty_like(routed)
    if T:
        _add_gated_kernel[(T, triton.cdiv(D, BLOCK))](routed, shared, gate, out, D, routed.stride(0),
                                                      shared.stride(0), gate.stride(0), out.stride(0), BLOCK=BLOCK,
                                                      num_warps=4, **launch_options(routed.device))
    return out


def add_gated_ref(routed: torch.Tensor, shared: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    return routed + torch.sigmoid(gate) * shared
