"""W8A8 experts at decode in one launch: x quantized, gate_up, h quantized and down, ordered by flags in memory.

At naive blocks (fused_moe_config.use_naive_blocks: one program row-block per slot) fused_moe's W8A8 layer is five
launches: per_token_quant(x), gate_up, per_token_quant(h), down, moe_sum. At one token each launch is a few
microseconds of latency around very little work, which is what keeps fp8 from its bandwidth advantage there
(docs/perf/moe_kernels.md, v5-v7). This kernel runs the first four as roles of one grid, in program order:

- programs [0, T): quantize x[t] into xq, xs (per_token_quant's values), then publish flag x_ready[t] = tag;
- the next T*K*n1 programs: gate_up of (slot s, column tile), as fused_moe's transposed fp8 product, once
  x_ready[t] holds this call's tag; h [S, I] in the activation dtype; the last program of a slot to finish (an
  acq_rel arrival count) quantizes h[s] into hq, hs and publishes h_ready[s] = tag;
- the last T*K*n2 programs: down of (slot s, column tile) once h_ready[s] holds the tag, router weight applied.
Then moe_sum, as fused_moe.

A program only waits for programs of lower index. GPUs start the programs of a one-dimensional grid in index order
and never suspend a started one, so the lowest unfinished program always runs and the launch cannot deadlock (the
Triton interpreter runs programs in index order too). A wait gives up after MAX_SPIN polls and counts the failure
in the sync buffer (`decode_moe_fp8` raises on it in debug mode; the tests read it).

The tag (one int per call) lives in the sync buffer: a call waits for tag = epoch + 1 and its last down program sets
epoch = tag, after every program of the call has read it (each down program waits on its slot's gate_up programs,
which wait on the x programs). The buffer persists per device, so calls on one device must not overlap in time (one
stream; PDL is fine: a launch waits for the previous one before it reads anything).

Variants: `decode_moe_fp8` (this), fused_moe's five launches (`fused_moe(..., quant=...)` with DECODE_FUSED off),
and the dequantized oracle (naive backend); the tests compare all three.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from moelab.kernels.fused_moe_config import GemmConfig
from moelab.kernels.moe_sum import moe_sum
from moelab.kernels.pdl import gdc_prologue, launch_options
from moelab.kernels.per_token_quant import FP8_MAX_C, MIN_SCALE_C, quant_block_k, quant_row, quant_scale, quantize

SCALE_CODES = {"fp8_tensor": 1, "fp8_channel": 2, "fp8_block": 3}
MAX_SPIN = 1 << 20  # polls before a wait gives up (under a second); see the module docstring
# sync buffer layout (int32): [epoch, done, failures, pad] + x_ready[MAX_TOKENS] + h_count[MAX_SLOTS] + h_ready[...]
HEADER = 4
MAX_TOKENS = 1024
MAX_SLOTS = 4096
X_READY = tl.constexpr(HEADER)
H_COUNT = tl.constexpr(HEADER + MAX_TOKENS)
H_READY = tl.constexpr(HEADER + MAX_TOKENS + MAX_SLOTS)
ROWS = tl.constexpr(16)  # the A tile's rows (one live): the narrowest row block of the transposed fp8 product


@triton.jit
def _quant_row_l2(v_ptr, q_ptr, s_ptr, K, QBLOCK: tl.constexpr):
    """quant_row of one row written by other programs of this launch: loads from L2 (.cg), not a stale L1 line."""
    offs = tl.arange(0, QBLOCK)
    amax = tl.zeros((QBLOCK,), dtype=tl.float32)
    for k in range(0, K, QBLOCK):
        v = tl.load(v_ptr + k + offs, mask=k + offs < K, other=0.0, cache_modifier=".cg").to(tl.float32)
        amax = tl.maximum(amax, tl.abs(v))
    s = quant_scale(tl.max(amax, axis=0), FP8_MAX_C, MIN_SCALE_C)
    for k in range(0, K, QBLOCK):
        v = tl.load(v_ptr + k + offs, mask=k + offs < K, other=0.0, cache_modifier=".cg")
        tl.store(q_ptr + k + offs, quantize(v, s, FP8_MAX_C).to(q_ptr.dtype.element_ty), mask=k + offs < K)
    tl.store(s_ptr, s)


@triton.jit
def _wait(flag_ptr, tag, fail_ptr, MAX_SPIN_: tl.constexpr):
    """Poll flag until it holds tag (acquire), then order the program's later reads after it."""
    n = 0
    while (tl.atomic_add(flag_ptr, 0, sem="acquire", scope="gpu") != tag) & (n < MAX_SPIN_):
        n += 1
    if n >= MAX_SPIN_:
        tl.atomic_add(fail_ptr, 1, sem="relaxed", scope="gpu")
    tl.debug_barrier()


@triton.jit
def _publish(flag_ptr, tag):
    """Release: every thread's stores before, then flag = tag."""
    tl.debug_barrier()
    tl.atomic_xchg(flag_ptr, tag, sem="release", scope="gpu")


@triton.jit
def _gate_up_role(p, xq_ptr, xs_ptr, w_ptr, ws_ptr, h_ptr, ids_ptr, sync_ptr, tag, top_k, I, D, stride_we,
                  stride_wn, stride_se, stride_sn, stride_sk, up_scale_row, hq_ptr, hs_ptr, W_SCALE: tl.constexpr,
                  BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr,
                  QBLOCK: tl.constexpr, MAX_SPIN_: tl.constexpr):
    n_tiles = tl.cdiv(I, BLOCK_N)
    slot = p // n_tiles
    pid_n = p % n_tiles
    t = (slot // top_k).to(tl.int64)
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    _wait(sync_ptr + X_READY + t, tag, sync_ptr + 2, MAX_SPIN_)
    lanes = tl.arange(0, ROWS)
    live = lanes == 0
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (offs_n % I).to(tl.int64)
    a_ptrs = xq_ptr + t * D + offs_k[None, :] + lanes[:, None] * 0
    if TMA:
        g_row = (expert * 2 * I + pid_n * BLOCK_N).to(tl.int32)
    else:
        g_ptrs = w_ptr + expert * stride_we + w_rows[:, None] * stride_wn + offs_k[None, :]
        u_ptrs = g_ptrs + I * stride_wn
    s_base = ws_ptr + expert * stride_se
    acc_g = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    acc_u = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(D, BLOCK_K), num_stages=STAGES):
        k_ok = offs_k < D - k * BLOCK_K
        a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        if TMA:
            g = w_ptr.load([g_row, k * BLOCK_K])
            u = w_ptr.load([g_row + I, k * BLOCK_K])
        else:
            g = tl.load(g_ptrs, mask=k_ok[None, :], other=0.0)
            u = tl.load(u_ptrs, mask=k_ok[None, :], other=0.0)
            g_ptrs += BLOCK_K
            u_ptrs += BLOCK_K
        if W_SCALE == 3:
            kb = (k * BLOCK_K) // 128 * stride_sk
            sg = tl.load(s_base + (w_rows // 128) * stride_sn + kb)
            su = tl.load(s_base + (up_scale_row + w_rows // 128) * stride_sn + kb)
            acc_g += tl.dot(g, tl.trans(a)) * sg[:, None]
            acc_u += tl.dot(u, tl.trans(a)) * su[:, None]
        else:
            acc_g = tl.dot(g, tl.trans(a), acc_g)
            acc_u = tl.dot(u, tl.trans(a), acc_u)
        a_ptrs += BLOCK_K
    acc_g = tl.trans(acc_g)
    acc_u = tl.trans(acc_u)
    if W_SCALE == 1:
        s = tl.load(s_base)
        acc_g *= s
        acc_u *= s
    elif W_SCALE == 2:
        acc_g *= tl.load(s_base + w_rows * stride_sn)[None, :]
        acc_u *= tl.load(s_base + (up_scale_row + w_rows) * stride_sn)[None, :]
    a_s = tl.load(xs_ptr + t, cache_modifier=".cg")
    acc_g *= a_s
    acc_u *= a_s
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + slot.to(tl.int64) * I + offs_n[None, :] + lanes[:, None] * 0, h.to(h_ptr.dtype.element_ty),
             mask=live[:, None] & (offs_n[None, :] < I))
    # the slot's last program quantizes its h row and lets the slot's down programs go
    count = sync_ptr + H_COUNT + slot
    tl.debug_barrier()
    if tl.atomic_add(count, 1, sem="acq_rel", scope="gpu") == n_tiles - 1:
        tl.debug_barrier()
        row = slot.to(tl.int64) * I
        _quant_row_l2(h_ptr + row, hq_ptr + row, hs_ptr + slot, I, QBLOCK)
        tl.store(count, 0)
        _publish(sync_ptr + H_READY + slot, tag)


@triton.jit
def _down_role(p, hq_ptr, hs_ptr, w_ptr, ws_ptr, y_ptr, ids_ptr, topk_weights_ptr, sync_ptr, tag, num_down, I, D,
               stride_we, stride_wn, stride_se, stride_sn, stride_sk, W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, STAGES: tl.constexpr, TMA: tl.constexpr, MAX_SPIN_: tl.constexpr):
    n_tiles = tl.cdiv(D, BLOCK_N)
    slot = p // n_tiles
    pid_n = p % n_tiles
    expert = tl.load(ids_ptr + slot).to(tl.int64)
    _wait(sync_ptr + H_READY + slot, tag, sync_ptr + 2, MAX_SPIN_)
    lanes = tl.arange(0, ROWS)
    live = lanes == 0
    offs_k = tl.arange(0, BLOCK_K)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    w_rows = (offs_n % D).to(tl.int64)
    a_ptrs = hq_ptr + slot.to(tl.int64) * I + offs_k[None, :] + lanes[:, None] * 0
    if TMA:
        b_row = (expert * D + pid_n * BLOCK_N).to(tl.int32)
    else:
        b_ptrs = w_ptr + expert * stride_we + w_rows[:, None] * stride_wn + offs_k[None, :]
    s_base = ws_ptr + expert * stride_se
    acc = tl.zeros((BLOCK_N, ROWS), dtype=tl.float32)
    for k in tl.range(0, tl.cdiv(I, BLOCK_K), num_stages=STAGES):
        k_ok = offs_k < I - k * BLOCK_K
        a = tl.load(a_ptrs, mask=live[:, None] & k_ok[None, :], other=0.0, cache_modifier=".cg")
        if TMA:
            b = w_ptr.load([b_row, k * BLOCK_K])
        else:
            b = tl.load(b_ptrs, mask=k_ok[None, :], other=0.0)
            b_ptrs += BLOCK_K
        if W_SCALE == 3:
            sb = tl.load(s_base + (w_rows // 128) * stride_sn + (k * BLOCK_K) // 128 * stride_sk)
            acc += tl.dot(b, tl.trans(a)) * sb[:, None]
        else:
            acc = tl.dot(b, tl.trans(a), acc)
        a_ptrs += BLOCK_K
    acc = tl.trans(acc)
    if W_SCALE == 1:
        acc *= tl.load(s_base)
    elif W_SCALE == 2:
        acc *= tl.load(s_base + w_rows * stride_sn)[None, :]
    weight = tl.load(topk_weights_ptr + slot) * tl.load(hs_ptr + slot, cache_modifier=".cg")
    tl.store(y_ptr + slot.to(tl.int64) * D + offs_n[None, :] + lanes[:, None] * 0, (acc * weight).to(
        y_ptr.dtype.element_ty), mask=live[:, None] & (offs_n[None, :] < D))
    # the call's last down program moves the epoch on (every program of the call has read it by then)
    done = sync_ptr + 1
    tl.debug_barrier()
    if tl.atomic_add(done, 1, sem="acq_rel", scope="gpu") == num_down - 1:
        tl.store(done, 0)
        tl.atomic_xchg(sync_ptr, tag, sem="release", scope="gpu")


@triton.jit(do_not_specialize=["T", "top_k"])
def _decode_moe_fp8_kernel(x_ptr, xq_ptr, xs_ptr, w13_ptr, w13_scale_ptr, h_ptr, hq_ptr, hs_ptr, w2_ptr,
                           w2_scale_ptr, y_ptr, ids_ptr, topk_weights_ptr, sync_ptr, T, top_k, I, D, stride_xt,
                           stride_w13e, stride_w13n, stride_s13e, stride_s13n, stride_s13k, up_scale_row,
                           stride_w2e, stride_w2n, stride_s2e, stride_s2n, stride_s2k, W_SCALE: tl.constexpr,
                           BLOCK_N1: tl.constexpr, BLOCK_K1: tl.constexpr, STAGES1: tl.constexpr,
                           TMA1: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K2: tl.constexpr,
                           STAGES2: tl.constexpr, TMA2: tl.constexpr, QBLOCK_D: tl.constexpr,
                           QBLOCK_I: tl.constexpr, MAX_SPIN_: tl.constexpr, USE_PDL: tl.constexpr = False):
    """Roles by program index: see the module docstring."""
    gdc_prologue(USE_PDL)
    pid = tl.program_id(0)
    tag = tl.load(sync_ptr, cache_modifier=".cg") + 1
    num_slots = T * top_k
    num_gate_up = num_slots * tl.cdiv(I, BLOCK_N1)
    if pid < T:
        quant_row(x_ptr, xq_ptr, xs_ptr, pid.to(tl.int64), D, stride_xt, D, FP8_MAX_C, MIN_SCALE_C, QBLOCK_D)
        _publish(sync_ptr + X_READY + pid, tag)
    elif pid < T + num_gate_up:
        _gate_up_role(pid - T, xq_ptr, xs_ptr, w13_ptr, w13_scale_ptr, h_ptr, ids_ptr, sync_ptr, tag, top_k, I, D,
                      stride_w13e, stride_w13n, stride_s13e, stride_s13n, stride_s13k, up_scale_row, hq_ptr, hs_ptr,
                      W_SCALE, BLOCK_N1, BLOCK_K1, STAGES1, TMA1, QBLOCK_I, MAX_SPIN_)
    else:
        _down_role(pid - T - num_gate_up, hq_ptr, hs_ptr, w2_ptr, w2_scale_ptr, y_ptr, ids_ptr, topk_weights_ptr,
                   sync_ptr, tag, num_slots * tl.cdiv(D, BLOCK_N2), I, D, stride_w2e, stride_w2n, stride_s2e,
                   stride_s2n, stride_s2k, W_SCALE, BLOCK_N2, BLOCK_K2, STAGES2, TMA2, MAX_SPIN_)


_SYNC: dict[torch.device, torch.Tensor] = {}


def sync_buffer(device: torch.device) -> torch.Tensor | None:
    """The device's sync buffer (zeroed once; the kernel leaves its counts at zero). None inside a CUDA-graph
    capture when it does not exist yet (a buffer from the graph's pool would not outlive the graph)."""
    buf = _SYNC.get(device)
    if buf is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            return None
        buf = _SYNC[device] = torch.zeros(HEADER + MAX_TOKENS + 2 * MAX_SLOTS, dtype=torch.int32, device=device)
    return buf


def failures(device: torch.device) -> int:
    """Waits that gave up on this device since the buffer was made (0 unless something is wrong)."""
    buf = _SYNC.get(device)
    return 0 if buf is None else int(buf[2])


def _strides(s: torch.Tensor) -> list[int]:
    return list(s.stride()) + [0] * (3 - s.dim())


def _tma_ok(w: torch.Tensor, cfg: GemmConfig) -> bool:
    if not cfg.tma or (w.device.type == "cuda" and torch.cuda.get_device_capability(w.device)[0] < 9):
        return False
    return w.is_contiguous() and (w.shape[-1] * w.element_size()) % 16 == 0 and w.data_ptr() % 16 == 0


def decode_moe_fp8(x: torch.Tensor, topk_ids: torch.Tensor, weights: torch.Tensor, w13: torch.Tensor,
                   w2: torch.Tensor, quant: str, w13_scale: torch.Tensor, w2_scale: torch.Tensor,
                   gate_up_cfg: GemmConfig, down_cfg: GemmConfig, sum_topk: bool = True) -> torch.Tensor | None:
    """fused_moe's W8A8 layer at naive blocks in one launch (+ moe_sum): x [T, D] in the activation dtype, topk_ids
    [T, K] (a token's experts distinct), weights [T*K] float32, w13 [E, 2I, D], w2 [E, D, I] contiguous fp8 with
    their scales; tiles from fused_moe's config (BLOCK_N >= 64, warps from gate_up's). None when the sync buffer
    cannot be made now (inside a capture) or the batch exceeds its flags: the caller takes its own path."""
    (T, D), K, I, code = x.shape, topk_ids.shape[1], w13.shape[1] // 2, SCALE_CODES[quant]
    sync = sync_buffer(x.device)
    if sync is None or T > MAX_TOKENS or T * K > MAX_SLOTS:
        return None
    dev = x.device
    xq = torch.empty(T, D, dtype=torch.float8_e4m3fn, device=dev)
    xs = torch.empty(T, dtype=torch.float32, device=dev)
    h = torch.empty(T * K, I, dtype=x.dtype, device=dev)
    hq = torch.empty(T * K, I, dtype=torch.float8_e4m3fn, device=dev)
    hs = torch.empty(T * K, dtype=torch.float32, device=dev)
    y = torch.empty(T * K, D, dtype=x.dtype, device=dev)
    tma1, tma2 = _tma_ok(w13, gate_up_cfg), _tma_ok(w2, down_cfg)
    w13_arg = TensorDescriptor.from_tensor(w13.view(-1, D), [gate_up_cfg.block_n, gate_up_cfg.block_k]) if tma1 \
        else w13
    w2_arg = TensorDescriptor.from_tensor(w2.view(-1, I), [down_cfg.block_n, down_cfg.block_k]) if tma2 else w2
    up_row = I if code == 2 else w13_scale.shape[1] // 2 if code == 3 else 0
    grid = T + T * K * (triton.cdiv(I, gate_up_cfg.block_n) + triton.cdiv(D, down_cfg.block_n))
    _decode_moe_fp8_kernel[(grid,)](
        x, xq, xs, w13_arg, w13_scale, h, hq, hs, w2_arg, w2_scale, y, topk_ids.reshape(-1).contiguous(), weights,
        sync, T, K, I, D, x.stride(0), w13.stride(0), w13.stride(1), *_strides(w13_scale), up_row, w2.stride(0),
        w2.stride(1), *_strides(w2_scale), W_SCALE=code, BLOCK_N1=gate_up_cfg.block_n,
        BLOCK_K1=gate_up_cfg.block_k, STAGES1=gate_up_cfg.num_stages, TMA1=tma1, BLOCK_N2=down_cfg.block_n,
        BLOCK_K2=down_cfg.block_k, STAGES2=down_cfg.num_stages, TMA2=tma2, QBLOCK_D=quant_block_k(D),
        QBLOCK_I=quant_block_k(I), MAX_SPIN_=MAX_SPIN, num_warps=gate_up_cfg.num_warps, **launch_options(dev))
    return y if K == 1 or not sum_topk else moe_sum(y, K)
