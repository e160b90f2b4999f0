"""Routing sort for the grouped MoE GEMM, without host synchronisation (CUDA-graph safe).

The T*K (token, slot) pairs, numbered slot = t*K + k, are grouped by expert, and each expert's run is padded
to a multiple of BLOCK_M with the sentinel T*K. Every output size depends only on (T*K, E, BLOCK_M), never on
the routing, so the launch can be captured in a CUDA graph.

`moe_align_quant` also quantizes the layer's input x per token to fp8 (as per_token_quant.py does) in the same
launch: programs past the ones that sort take one row of x each, so a W8A8 layer pays no launch for it.

Variants: `moe_align` (Triton counting sort: histogram, prefix sum, atomic per-expert cursors; one launch while
the slots fit one program, else a count launch and a place launch; the order of slots inside an expert's run
may differ from run to run), `moe_align_ref` (plain torch ops; stable order inside a run).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options
from moelab.kernels.per_token_quant import FP8_MAX_C, MIN_SCALE_C, per_token_quant, quant_block_k, quant_row

# One program places up to this many slots by itself (one launch); above it the slots are split into chunks of
# at least CHUNK_SLOTS over at most MAX_CHUNKS programs (a count launch, then a place launch). On the H100 one
# program took 4-9 us up to 2048 slots and was never slower than the chunked pair there (docs/perf/moe_kernels.md).
SINGLE_PROGRAM_SLOTS = 2048
CHUNK_SLOTS = 1024
MAX_CHUNKS = 128
NUM_WARPS = 4


class AlignedRouting(NamedTuple):
    sorted_ids: torch.Tensor  # [P] int32: slot ids grouped by expert; each run padded with the sentinel T*K
    expert_ids: torch.Tensor  # [cdiv(P, BLOCK_M)] int32: expert of each BLOCK_M rows; -1 past num_padded
    num_padded: torch.Tensor  # [1] int32: rows in use, a multiple of BLOCK_M


def padded_size(num_slots: int, num_experts: int, block_m: int) -> int:
    """Upper bound P on the padded rows: each non-empty expert adds at most BLOCK_M - 1 padding rows."""
    return num_slots + min(num_slots, num_experts) * (block_m - 1)


@triton.jit
def _histogram(ids_ptr, start, end, num_experts, E_PAD: tl.constexpr, CHUNK: tl.constexpr):
    """Counts [E_PAD] of the expert ids in ids[start:end]; bins >= num_experts are 0."""
    counts = tl.zeros([E_PAD], dtype=tl.int32)
    for s in range(start, end, CHUNK):
        offs = s + tl.arange(0, CHUNK)
        e = tl.load(ids_ptr + offs, mask=offs < end, other=E_PAD - 1).to(tl.int32)  # bin E_PAD - 1 >= E: spare
        counts += tl.histogram(e, E_PAD)
    return tl.where(tl.arange(0, E_PAD) < num_experts, counts, 0)


@triton.jit
def _quant_role(pid, first, x_ptr, xq_ptr, xs_ptr, D, stride_x, stride_q, QUANT: tl.constexpr,
                QBLOCK: tl.constexpr):
    """True (after quantizing row pid - first of x) for the programs past the sorting ones."""
    if QUANT:
        if pid >= first:
            quant_row(x_ptr, xq_ptr, xs_ptr, (pid - first).to(tl.int64), D, stride_x, stride_q, FP8_MAX_C,
                      MIN_SCALE_C, QBLOCK)
            return True
    return False


@triton.jit(do_not_specialize=["num_slots", "chunk", "num_experts"])  # D, strides: 16-divisibility -> vector loads
def _count_kernel(ids_ptr, counts_ptr, num_slots, chunk, num_experts, x_ptr, xq_ptr, xs_ptr, D, stride_x, stride_q,
                  E_PAD: tl.constexpr, CHUNK: tl.constexpr, QUANT: tl.constexpr = False,
                  QBLOCK: tl.constexpr = 16, USE_PDL: tl.constexpr = False):
    """counts[c, e] = slots of chunk c routed to expert e; QUANT: programs past the chunks quantize x rows."""
    gdc_prologue(USE_PDL)
    pid = tl.program_id(0)
    if _quant_role(pid, tl.cdiv(num_slots, chunk), x_ptr, xq_ptr, xs_ptr, D, stride_x, stride_q, QUANT, QBLOCK):
        return
    start = pid * chunk
    counts = _histogram(ids_ptr, start, tl.minimum(start + chunk, num_slots), num_experts, E_PAD, CHUNK)
    tl.store(counts_ptr + pid * E_PAD + tl.arange(0, E_PAD), counts)


@triton.jit(do_not_specialize=["num_slots", "chunk", "num_chunks", "num_blocks", "num_experts"])
def _place_kernel(ids_ptr, counts_ptr, cursor_ptr, sorted_ptr, expert_ids_ptr, num_padded_ptr, num_slots, chunk,
                  num_chunks, num_blocks, num_experts, x_ptr, xq_ptr, xs_ptr, D, stride_x, stride_q,
                  BLOCK_M: tl.constexpr, E_PAD: tl.constexpr, CHUNK: tl.constexpr, CHUNK_ROWS: tl.constexpr,
                  PAD_COLS: tl.constexpr, SUB: tl.constexpr, SINGLE: tl.constexpr, QUANT: tl.constexpr = False,
                  QBLOCK: tl.constexpr = 16, USE_PDL: tl.constexpr = False):
    """Program c places chunk c's slots through per-expert atomic cursors of its own (so the order inside an
    expert run is not fixed; each row is computed on its own, so the GEMM results do not depend on it), and
    writes a share of the padding sentinels and of the block -> expert map; program 0 writes the total.
    QUANT (with SINGLE only): programs past the first quantize x rows."""
    gdc_prologue(USE_PDL)
    pid = tl.program_id(0)
    if _quant_role(pid, num_chunks, x_ptr, xq_ptr, xs_ptr, D, stride_x, stride_q, QUANT, QBLOCK):
        return
    experts = tl.arange(0, E_PAD)
    if SINGLE:  # one program: count everything here
        total = _histogram(ids_ptr, 0, num_slots, num_experts, E_PAD, CHUNK)
        before = tl.zeros([E_PAD], dtype=tl.int32)
    else:  # totals over all chunks, and the slots of each expert in the chunks before this one
        total = tl.zeros([E_PAD], dtype=tl.int32)
        before = tl.zeros([E_PAD], dtype=tl.int32)
        for c0 in range(0, num_chunks, CHUNK_ROWS):
            rows = c0 + tl.arange(0, CHUNK_ROWS)
            tile = tl.load(counts_ptr + rows[:, None] * E_PAD + experts[None, :], mask=rows[:, None] < num_chunks,
                           other=0)
            total += tl.sum(tile, axis=0)
            before += tl.sum(tl.where(rows[:, None] < pid, tile, 0), axis=0)
    padded = (total + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    run_end = tl.cumsum(padded, axis=0)  # [E_PAD] end of each expert's padded run
    cursors = cursor_ptr + pid * E_PAD
    tl.store(cursors + experts, run_end - padded + before)  # next free row of each expert for this chunk
    tl.debug_barrier()
    start = pid * chunk
    end = tl.minimum(start + chunk, num_slots)
    for s in range(start, end, CHUNK):
        offs = s + tl.arange(0, CHUNK)
        live = offs < end
        e = tl.load(ids_ptr + offs, mask=live, other=0).to(tl.int32)
        dest = tl.atomic_add(cursors + e, 1, mask=live, sem="relaxed")
        tl.store(sorted_ptr + dest, offs.to(tl.int32), mask=live)
    total_padded = tl.sum(padded, axis=0)
    pad_start = run_end - padded + total
    sentinel = tl.zeros([E_PAD, PAD_COLS], dtype=tl.int32) + num_slots
    for j0 in range(pid * PAD_COLS, BLOCK_M, num_chunks * PAD_COLS):
        pos = pad_start[:, None] + j0 + tl.arange(0, PAD_COLS)[None, :]
        tl.store(sorted_ptr + pos, sentinel, mask=pos < run_end[:, None])
    if SINGLE:  # the first row of every block in use is a real slot: its expert is the block's
        tl.debug_barrier()
        for b0 in range(0, num_blocks, CHUNK):
            blocks = b0 + tl.arange(0, CHUNK)
            in_use = blocks * BLOCK_M < total_padded
            first = tl.load(sorted_ptr + blocks * BLOCK_M, mask=in_use, other=0)
            expert = tl.load(ids_ptr + first, mask=in_use, other=-1).to(tl.int32)
            tl.store(expert_ids_ptr + blocks, expert, mask=blocks < num_blocks)
    else:
        for b0 in range(pid * SUB, num_blocks, num_chunks * SUB):
            blocks = b0 + tl.arange(0, SUB)
            first_row = blocks * BLOCK_M
            expert = tl.sum((run_end[:, None] <= first_row[None, :]).to(tl.int32), axis=0)
            tl.store(expert_ids_ptr + blocks, tl.where(first_row < total_padded, expert, -1),
                     mask=blocks < num_blocks)
    if pid == 0:
        tl.store(num_padded_ptr, total_padded)


def _pow2_at_least(n: int, floor: int = 16) -> int:
    return max(floor, triton.next_power_of_2(n))


def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int, single_program_slots: int | None = None
              ) -> AlignedRouting:
    """topk_ids [T, K] (int32/int64, values in [0, E)) -> AlignedRouting with P = padded_size(T*K, E, block_m).
    single_program_slots overrides SINGLE_PROGRAM_SLOTS (the one-launch limit)."""
    return _align(topk_ids, num_experts, block_m, single_program_slots, None)[0]


def moe_align_quant(topk_ids: torch.Tensor, num_experts: int, block_m: int, x: torch.Tensor,
                    single_program_slots: int | None = None
                    ) -> tuple[AlignedRouting, torch.Tensor, torch.Tensor]:
    """moe_align, plus x [T, D] quantized per token as per_token_quant(x) returns it ((q [T, D] float8_e4m3fn,
    s [T] float32), the same values) by extra programs of the same launch."""
    if x.dim() != 2 or x.stride(1) != 1 or topk_ids.dim() != 2 or x.shape[0] != topk_ids.shape[0]:
        raise ValueError(f"moe_align_quant: want x [T, D] with a contiguous last dim and topk_ids [T, K]; got x "
                         f"{tuple(x.shape)} strides {x.stride()}, topk_ids {tuple(topk_ids.shape)}")
    return _align(topk_ids, num_experts, block_m, single_program_slots, x)


def _align(topk_ids: torch.Tensor, num_experts: int, block_m: int, single_program_slots: int | None,
           x: torch.Tensor | None) -> tuple:
    if topk_ids.dim() != 2 or topk_ids.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_ids must be [T, K] int32/int64, got {tuple(topk_ids.shape)} {topk_ids.dtype}")
    if block_m < 1 or block_m & (block_m - 1):
        raise ValueError(f"block_m must be a power of two, got {block_m}")
    ids = topk_ids.reshape(-1).contiguous()
    n = ids.numel()
    size = padded_size(n, num_experts, block_m)
    num_blocks = triton.cdiv(size, block_m)
    dev = ids.device
    sorted_ids = torch.empty(size, dtype=torch.int32, device=dev)
    expert_ids = torch.empty(num_blocks, dtype=torch.int32, device=dev)
    num_padded = torch.empty(1, dtype=torch.int32, device=dev)
    if x is None:
        quant, qargs, extra = (), [ids, ids, ids, 0, 0, 0], 0
    else:
        T, D = x.shape
        xq = torch.empty(T, D, dtype=torch.float8_e4m3fn, device=dev)
        xs = torch.empty(T, dtype=torch.float32, device=dev)
        quant, qargs, extra = (xq, xs), [x, xq, xs, D, x.stride(0), xq.stride(0)], T
    qflags = dict(QUANT=x is not None, QBLOCK=quant_block_k(x.shape[1]) if x is not None else 16)
    if n == 0:
        if x is not None:  # nothing to sort; the rows still need their quantization
            quant = per_token_quant(x)
        return (AlignedRouting(sorted_ids, expert_ids.fill_(-1), num_padded.zero_()), *quant)
    e_pad = _pow2_at_least(num_experts + 1)  # one spare histogram bin for masked lanes
    if n <= (SINGLE_PROGRAM_SLOTS if single_program_slots is None else single_program_slots):
        chunk, num_chunks, counts = n, 1, ids  # counts unused
    else:
        chunk = triton.cdiv(max(CHUNK_SLOTS, triton.cdiv(n, MAX_CHUNKS)), CHUNK_SLOTS) * CHUNK_SLOTS
        num_chunks = triton.cdiv(n, chunk)
        counts = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
        _count_kernel[(num_chunks + extra,)](ids, counts, n, chunk, num_experts, *qargs, E_PAD=e_pad,
                                             CHUNK=CHUNK_SLOTS, **qflags, num_warps=NUM_WARPS, **launch_options(dev))
        extra, qflags = 0, dict(QUANT=False, QBLOCK=16)  # the count launch quantized x
    cursors = torch.empty(num_chunks, e_pad, dtype=torch.int32, device=dev)
    _place_kernel[(num_chunks + extra,)](ids, counts, cursors, sorted_ids, expert_ids, num_padded, n, chunk,
                                         num_chunks, num_blocks, num_experts, *qargs, BLOCK_M=block_m, E_PAD=e_pad,
                                         CHUNK=CHUNK_SLOTS, CHUNK_ROWS=max(1, 4096 // e_pad),
                                         PAD_COLS=min(block_m, max(1, 4096 // e_pad)), SUB=max(16, 8192 // e_pad),
                                         SINGLE=num_chunks == 1, **qflags, num_warps=NUM_WARPS,
                                         **launch_options(dev))
    return (AlignedRouting(sorted_ids, expert_ids, num_padded), *quant)


def moe_align_ref(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> AlignedRouting:
    """Plain-torch twin of moe_align (also sync-free): same runs, sentinels and sizes; slot order in each run."""
    flat = topk_ids.reshape(-1)
    n, dev = flat.numel(), flat.device
    size = padded_size(n, num_experts, block_m)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=dev).scatter_add_(0, flat.long(), torch.ones_like(
        flat, dtype=torch.int64))
    padded = (counts + block_m - 1) // block_m * block_m
    run_end = padded.cumsum(0)
    order = flat.argsort(stable=True)  # [n] slots grouped by expert, in slot order within an expert
    expert = flat[order].long()
    rank = torch.arange(n, device=dev) - (counts.cumsum(0) - counts)[expert]
    sorted_ids = torch.full((size,), n, dtype=torch.int32, device=dev)
    sorted_ids[(run_end - padded)[expert] + rank] = order.to(torch.int32)
    first_row = torch.arange(triton.cdiv(size, block_m), device=dev) * block_m
    total = run_end[-1:]
    expert_ids = torch.where(first_row < total, torch.searchsorted(run_end, first_row, right=True), -1)
    return AlignedRouting(sorted_ids, expert_ids.to(torch.int32), total.to(torch.int32))
