"""Greedy token ids with a finiteness check, in one Triton kernel: `argmax_rows(logits)` -> [2, rows]: row 0 the
first index of each row's maximum, or -1 for a row whose logits are not all usable (a NaN anywhere, or a maximum of
+inf / -inf); row 1 the same with 0 in place of -1 (safe to feed back as the next input id, as overlapped steps
do before the host has seen the -1); `argmax_rows_ref` beside it.

torch's argmax over one 50k-wide row runs as one reduction block (12-16 us per batch-1 decode step on an H200,
1.5 % of the step) and returns an arbitrary id for a NaN row. Here each row is split over up to MAX_SPLITS programs;
each scans its part (NaNs counted, then taken as -inf), stores its (max, first index, NaN count), and the row's
last program to arrive (an acq_rel counter that resets itself) combines the parts in split order, so the first
maximal index wins as in torch. The result does not depend on timing.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.device import num_sms
from moelab.kernels.counters import arrival_counters
from moelab.kernels.pdl import gdc_prologue, launch_options

MAX_SPLITS = 32
MAX_ROWS = 4096  # rows of one launch with a split (the counters); more rows run unsplit


@triton.jit
def _argmax_kernel(x_ptr, out_ptr, part_v_ptr, part_i_ptr, part_n_ptr, count_ptr, stride_out, V, stride_x, chunk,
                   num_splits, BLOCK: tl.constexpr, SPLITS_PAD: tl.constexpr, USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    split = tl.program_id(1)
    offs = tl.arange(0, BLOCK)
    start = split * chunk
    end = tl.minimum(start + chunk, V)
    best_v = -float("inf")
    best_i = V  # no index yet (an all -inf part keeps V: the combine maps it to -1)
    nans = 0
    for c0 in range(start, end, BLOCK):
        idx = c0 + offs
        v = tl.load(x_ptr + row * stride_x + idx, mask=idx < end, other=-float("inf")).to(tl.float32)
        nans += tl.sum((v != v).to(tl.int32), axis=0)
        v = tl.where(v != v, -float("inf"), v)
        m = tl.max(v, axis=0)
        i = tl.min(tl.where((v == m) & (idx < end), idx, V), axis=0)
        better = m > best_v
        best_i = tl.where(better, i, best_i)
        best_v = tl.where(better, m, best_v)
    if num_splits == 1:
        ok = (nans == 0) & (best_v < float("inf")) & (best_v > -float("inf"))
        tl.store(out_ptr + row, tl.where(ok, best_i, -1).to(tl.int64))
        tl.store(out_ptr + stride_out + row, tl.where(ok, best_i, 0).to(tl.int64))
    else:
        cell = row * SPLITS_PAD + split
        tl.store(part_v_ptr + cell, best_v)
        tl.store(part_i_ptr + cell, best_i)
        tl.store(part_n_ptr + cell, nans)
        tl.debug_barrier()
        arrived = tl.atomic_add(count_ptr + row, 1, sem="acq_rel")
        if arrived == num_splits - 1:
            s = tl.arange(0, SPLITS_PAD)
            sm = s < num_splits
            pv = tl.load(part_v_ptr + row * SPLITS_PAD + s, mask=sm, other=-float("inf"), cache_modifier=".cg")
            pi = tl.load(part_i_ptr + row * SPLITS_PAD + s, mask=sm, other=V, cache_modifier=".cg")
            pn = tl.load(part_n_ptr + row * SPLITS_PAD + s, mask=sm, other=0, cache_modifier=".cg")
            m = tl.max(pv, axis=0)
            i = tl.min(tl.where(pv == m, pi, V), axis=0)  # parts are in index order: the smallest index wins
            ok = (tl.sum(pn, axis=0) == 0) & (m < float("inf")) & (m > -float("inf"))
            tl.store(out_ptr + row, tl.where(ok, i, -1).to(tl.int64))
            tl.store(out_ptr + stride_out + row, tl.where(ok, i, 0).to(tl.int64))
            tl.store(count_ptr + row, 0)


def argmax_rows(x: torch.Tensor, num_splits: int | None = None, block: int = 2048, num_warps: int = 4,
                out: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, V] (unit last stride) -> int64 [2, N]: [0] the first index of each row's maximum, -1 for a row with a
    NaN or a non-finite maximum; [1] the same with 0 for those rows. num_splits None: the default rule;
    block (values per load) and num_warps are launch parameters (the bench sweeps them). out: an int64 [2, N]
    with a unit last stride to write into (a CUDA graph's static buffer), returned."""
    if x.dim() != 2 or x.stride(1) != 1:
        raise ValueError(f"argmax_rows takes [rows, vocab] with a unit last stride, got {tuple(x.shape)} "
                         f"strides {x.stride()}")
    if block < 128 or block & (block - 1):
        raise ValueError(f"block must be a power of two >= 128, got {block}")
    N, V = x.shape
    if V == 0:
        raise ValueError("argmax_rows needs at least one value per row, got a vocabulary of 0")
    if out is None:
        out = torch.empty(2, N, dtype=torch.int64, device=x.device)
    elif out.shape != (2, N) or out.dtype != torch.int64 or out.stride(1) != 1 or out.device != x.device:
        raise ValueError(f"out must be int64 [2, {N}] with a unit last stride on {x.device}, got {out.dtype} "
                         f"{tuple(out.shape)} strides {out.stride()} on {out.device}")
    if N == 0:
        return out
    if num_splits is None:
        num_splits = default_splits(N, V, num_sms(x.device))
    if not 1 <= num_splits <= MAX_SPLITS or (num_splits > 1 and N > MAX_ROWS):
        raise ValueError(f"num_splits must be in [1, {MAX_SPLITS}] (1 above {MAX_ROWS} rows), got {num_splits}")
    chunk = triton.cdiv(triton.cdiv(V, num_splits), block) * block
    num_splits = triton.cdiv(V, chunk)  # no empty part
    pad = max(2, triton.next_power_of_2(num_splits))
    if num_splits > 1:
        pv = torch.empty(N * pad, dtype=torch.float32, device=x.device)
        pi = torch.empty(N * pad, dtype=torch.int32, device=x.device)
        pn = torch.empty(N * pad, dtype=torch.int32, device=x.device)
        count = arrival_counters("argmax", MAX_ROWS, x.device)
    else:
        pv = pi = pn = count = out
    _argmax_kernel[(N, num_splits)](x, out, pv, pi, pn, count, out.stride(0), V, x.stride(0), chunk, num_splits,
                                    BLOCK=block, SPLITS_PAD=pad, num_warps=num_warps, **launch_options(x.device))
    return out


def default_splits(N: int, V: int, sms: int) -> int:
    """About 16 programs per SM, parts of at least 2048 values, none above MAX_ROWS rows: read off the H200 sweep
    of 3 vocabularies x 1-512 rows x 36 launches (docs/perf/runs/decode-kernels-h200-argmax-v1.json), where 8-16
    parts of 2048-value loads with 4 warps won from 256 rows on and the most parts won below."""
    if N > MAX_ROWS:
        return 1
    return max(1, min(MAX_SPLITS, V // 2048, triton.cdiv(16 * sms, N)))


def argmax_rows_ref(x: torch.Tensor) -> torch.Tensor:
    """The same with torch: [0] first maximal index, -1 where a row has a NaN or a non-finite maximum; [1] 0 there."""
    xf = x.float()
    vals, ids = torch.where(torch.isnan(xf), -float("inf"), xf).max(dim=-1)
    ok = ~torch.isnan(xf).any(dim=-1) & torch.isfinite(vals)
    return torch.stack([torch.where(ok, ids, -1), torch.where(ok, ids, 0)])
