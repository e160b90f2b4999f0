"""Fused MoE experts: two Triton grouped GEMMs over the aligned routing of moe_align.py.

gate_up: h[r] = silu(x[t] G[e]^T) * (x[t] U[e]^T) for each sorted row r (slot s = t*K + k of expert e), with
    G, U the gate and up rows of w13 [E, 2I, D]; h [P, I] in the activation dtype, rows in sorted order
    (padding rows hold zeros), so the down GEMM reads its rows contiguously.
down: y[s] = w[s] * (h[r] W2[e]^T) [T*K, D], rows in slot order.
sum: out[t] = sum_k y[t*K + k] [T, D] (moe_sum.py).

Both accumulate in float32 and write the activation dtype. The grid is sized on the host from (T*K, E,
BLOCK_M); programs past the padded row count return at once, so nothing reads the routing on the host and the
whole layer can be captured in a CUDA graph. Decode (see fused_moe_config.use_naive_blocks) skips the sort:
program row-block b holds slot b alone.

Variants: `fused_moe` (Triton, tile config from fused_moe_config), `fused_moe_ref` (plain torch, float32).
"""

from __future__ import annotations

import functools
import os
from typing import NamedTuple

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moelab.kernels.fused_moe_config import GemmConfig, MoEConfig, get_config, use_naive_blocks
from moelab.kernels.moe_align import moe_align
from moelab.kernels.moe_sum import moe_sum

NAIVE_BLOCK_M = 16


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


@triton.jit(do_not_specialize=_RUNTIME_INTS)
def _gate_up_kernel(x_ptr, w_ptr, h_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr, topk_ids_ptr,
                    num_slots, top_k, num_pid_m, group_m, N, K, stride_xt, stride_we, stride_wn, stride_wk,
                    stride_hr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    NAIVE: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """h[rows, n-tile] = silu(A G^T) * (A U^T), A = x[slot // top_k] gathered; N = I, K = D.
    USE_TMA: w_ptr is a TMA descriptor over w13 viewed [E * 2N, K] with [BLOCK_N, BLOCK_K] boxes."""
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
        g_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
        u_ptrs = g_ptrs + N * stride_wn
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if EVEN_K:
            a = tl.load(a_ptrs, mask=live[:, None], other=0.0)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0)
        if USE_TMA:
            g = w_ptr.load([g_row, k * BLOCK_K]).T
            u = w_ptr.load([g_row + N, k * BLOCK_K]).T
        elif EVEN_K:
            g = tl.load(g_ptrs)
            u = tl.load(u_ptrs)
        else:
            g = tl.load(g_ptrs, mask=k_ok[:, None], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[:, None], other=0.0)
        acc_g = tl.dot(a, g, acc_g, input_precision=PRECISION)
        acc_u = tl.dot(a, u, acc_u, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        if not USE_TMA:
            g_ptrs += BLOCK_K * stride_wk
            u_ptrs += BLOCK_K * stride_wk
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    tl.store(h_ptr + rows[:, None] * stride_hr + offs_n[None, :], h.to(h_ptr.dtype.element_ty),
             mask=offs_n[None, :] < N)


@triton.jit(do_not_specialize=_RUNTIME_INTS[:1] + _RUNTIME_INTS[2:])
def _down_kernel(h_ptr, w_ptr, y_ptr, topk_weights_ptr, sorted_ids_ptr, expert_ids_ptr, num_padded_ptr,
                 topk_ids_ptr, num_slots, num_pid_m, group_m, N, K, stride_hr, stride_we, stride_wn, stride_wk,
                 stride_ys, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                 NAIVE: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr):
    """y[slot, n-tile] = w[slot] * (h[rows] W2^T); N = D, K = I.
    USE_TMA: h_ptr and w_ptr are TMA descriptors over h [P, K] ([BLOCK_M, BLOCK_K] boxes) and w2 viewed
    [E * N, K] ([BLOCK_N, BLOCK_K] boxes); zero fill past K replaces the masks."""
    pid_m, pid_n = _tile(num_pid_m, tl.cdiv(N, BLOCK_N), group_m)
    if NAIVE:
        num_rows = num_pid_m * BLOCK_M
    else:
        num_rows = tl.load(num_padded_ptr)
    if pid_m * BLOCK_M >= num_rows:  # past the padded rows of this routing
        return
    expert, slots = _rows(pid_m, sorted_ids_ptr, expert_ids_ptr, topk_ids_ptr, num_slots, BLOCK_M, NAIVE)
    live = slots < num_slots
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (offs_n % N).to(tl.int64)
    rows = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    if USE_TMA:
        b_row = (expert * N + pid_n * BLOCK_N).to(tl.int32)
    else:
        a_ptrs = h_ptr + rows[:, None] * stride_hr + offs_k[None, :]
        b_ptrs = w_ptr + expert * stride_we + w_rows[None, :] * stride_wn + offs_k[:, None] * stride_wk
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        if USE_TMA:
            a = h_ptr.load([pid_m * BLOCK_M, k * BLOCK_K])
            b = w_ptr.load([b_row, k * BLOCK_K]).T
        elif EVEN_K:
            a = tl.load(a_ptrs)
            b = tl.load(b_ptrs)
        else:
            k_ok = offs_k < K - k * BLOCK_K
            a = tl.load(a_ptrs, mask=k_ok[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_ok[:, None], other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if not USE_TMA:
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_wk
    weight = tl.load(topk_weights_ptr + slots, mask=live, other=0.0)
    y = acc * weight[:, None]
    tl.store(y_ptr + slots.to(tl.int64)[:, None] * stride_ys + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n[None, :] < N))


def _check(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
           w2: torch.Tensor) -> None:
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
    if not (x.dtype == w13.dtype == w2.dtype) or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
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


def config_for(x: torch.Tensor, top_k: int, w13: torch.Tensor) -> MoEConfig:
    """The tile config fused_moe uses for this x [T, D], top-k and w13 [E, 2I, D]."""
    (T, D), E, I = x.shape, w13.shape[0], w13.shape[1] // 2
    dtype = str(x.dtype).removeprefix("torch.")
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
    aligned = moe_align(topk_ids, num_experts, block_m)
    return Routing(*aligned, ids, K, block_m, aligned.expert_ids.numel(), False)


def _launch_args(r: Routing, cfg: GemmConfig, K: int, dtype: torch.dtype, tma: bool) -> dict:
    return dict(BLOCK_M=r.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, NAIVE=r.naive,
                EVEN_K=K % cfg.block_k == 0, PRECISION="ieee" if dtype == torch.float32 else "tf32", USE_TMA=tma,
                num_warps=cfg.num_warps, num_stages=cfg.num_stages)


def _tma_ok(*ts: torch.Tensor) -> bool:
    """TMA descriptors need Hopper or newer (or the interpreter), contiguous rows of 16-byte multiples."""
    if ts[0].device.type == "cuda" and torch.cuda.get_device_capability(ts[0].device)[0] < 9:
        return False
    return all(t.is_contiguous() and (t.shape[-1] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0
               for t in ts)


def _desc(t: torch.Tensor, rows: int, box: list[int]) -> TensorDescriptor:
    return TensorDescriptor.from_tensor(t.view(rows, t.shape[-1]), box)


def gate_up(x: torch.Tensor, w13: torch.Tensor, r: Routing, cfg: GemmConfig) -> torch.Tensor:
    """x [T, D], w13 [E, 2I, D] -> h [num_pid_m * block_m, I]: silu(gate) * up per sorted row."""
    (E, two_i, D), I = w13.shape, w13.shape[1] // 2
    h = torch.empty(r.num_pid_m * r.block_m, I, dtype=x.dtype, device=x.device)
    tma = cfg.tma and _tma_ok(w13)
    w = _desc(w13, E * two_i, [cfg.block_n, cfg.block_k]) if tma else w13
    _gate_up_kernel[(r.num_pid_m * triton.cdiv(I, cfg.block_n),)](
        x, w, h, r.sorted_ids, r.expert_ids, r.num_padded, r.ids, r.ids.numel(), r.top_k, r.num_pid_m,
        cfg.group_m, I, D, x.stride(0), w13.stride(0), w13.stride(1), w13.stride(2), h.stride(0),
        **_launch_args(r, cfg, D, x.dtype, tma))
    return h


def down(h: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor, r: Routing, cfg: GemmConfig
         ) -> torch.Tensor:
    """h [P, I], w2 [E, D, I], topk_weights [T*K] float32 -> y [T*K, D]: router-weighted rows in slot order."""
    E, D, I = w2.shape
    y = torch.empty(r.ids.numel(), D, dtype=h.dtype, device=h.device)
    tma = cfg.tma and _tma_ok(w2, h)
    a = _desc(h, h.shape[0], [r.block_m, cfg.block_k]) if tma else h
    w = _desc(w2, E * D, [cfg.block_n, cfg.block_k]) if tma else w2
    _down_kernel[(r.num_pid_m * triton.cdiv(D, cfg.block_n),)](
        a, w, y, topk_weights, r.sorted_ids, r.expert_ids, r.num_padded, r.ids, r.ids.numel(), r.num_pid_m,
        cfg.group_m, D, I, h.stride(0), w2.stride(0), w2.stride(1), w2.stride(2), y.stride(0),
        **_launch_args(r, cfg, I, h.dtype, tma))
    return y


def fused_moe(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
              w2: torch.Tensor, config: MoEConfig | None = None) -> torch.Tensor:
    """x [T, D], topk_ids [T, K], topk_weights [T, K], w13 [E, 2I, D] (gate rows then up rows), w2 [E, D, I]
    -> [T, D] in x's dtype: sum_k w[t,k] * W2[e] (silu(G[e] x[t]) * (U[e] x[t])), e = topk_ids[t,k]."""
    _check(x, topk_ids, topk_weights, w13, w2)
    (T, D), K = x.shape, topk_ids.shape[1]
    if T * K == 0:
        return x.new_zeros(T, D)
    cfg = config or config_for(x, K, w13)
    r = route(topk_ids, w13.shape[0], cfg.block_m)
    h = gate_up(x, w13, r, cfg.gate_up)
    y = down(h, w2, topk_weights.reshape(-1).contiguous().float(), r, cfg.down)  # [T*K, D]
    return y if K == 1 else moe_sum(y, K)


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
