"""Paged attention over a block-table KV cache, in one Triton kernel: prefill, chunked prefill after a cached
prefix, decode, and mixed batches of the three; MHA, GQA and the absorbed MLA latent cache (V = the first Dv
channels of K, read once). Decode with few programs per SM splits the keys (flash-decoding) and reduces the
partial results in a second kernel. `paged_attention_ref` is the plain-torch twin.

Position convention: query i of sequence b (0 <= i < qlen_b) sits at position seq_len_b - qlen_b + i and attends
to cache positions 0..that position; seq_len_b counts this step's tokens, whose K/V are already in the cache.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from moelab.device import num_sms
from moelab.kernels.counters import arrival_counters
from moelab.kernels.pdl import gdc_prologue, launch_options

LOG2E = 1.4426950408889634
TARGET_WAVES = 2  # decode: split the keys until the grid holds about this many programs per SM
MIN_KEYS_PER_SPLIT = 256
SHORT_SPLITS = 16  # below MIN_KEYS_PER_SPLIT * SHORT_SPLITS keys: up to this many splits of >= one 32-key step
MAX_SPLITS = 64
MAX_FUSED_ROWS = 16384  # grid rows (tiles x KV heads x head chunks) whose splits can reduce in the kernel
_fuse_reduce = True  # decode splits reduced by their last program (no reduce launch); set_fused_reduce: A/B


def set_fused_reduce(on: bool) -> None:
    """Reduce key splits inside the attention kernel (True) or in _split_reduce_kernel (A/B timings; CUDA graphs
    must be recaptured)."""
    global _fuse_reduce
    _fuse_reduce = bool(on)


class PagedAttentionConfig(NamedTuple):
    block_q: int  # query tokens per program
    heads_per_prog: int  # query heads of one KV head per program; rows = block_q * heads_per_prog (padded to 16+)
    block_n: int  # keys per inner step
    num_warps: int
    num_stages: int


@triton.jit
def _load_rows(row_ptr, row_ok, COL0: tl.constexpr, NCOL: tl.constexpr, NVALID: tl.constexpr, MASK: tl.constexpr):
    """[rows, NCOL] elements at columns COL0.. of each row pointer; columns >= NVALID (and, with MASK, rows not
    ok) read 0. Without masks the loads stay unpredicated and vectorised."""
    c = COL0 + tl.arange(0, NCOL)
    ptrs = row_ptr[:, None] + c[None, :]
    if COL0 + NCOL > NVALID:
        if MASK:
            x = tl.load(ptrs, mask=row_ok[:, None] & (c[None, :] < NVALID), other=0.0)
        else:
            x = tl.load(ptrs, mask=c[None, :] < NVALID, other=0.0)
    else:
        if MASK:
            x = tl.load(ptrs, mask=row_ok[:, None], other=0.0)
        else:
            x = tl.load(ptrs)
    return x


@triton.jit
def _attend_tile(acc, l_i, m_i, q_main, q_tail, q_pos, j, kv_end, bt_row, k_base, v_base,
                 stride_kb, stride_ks, stride_vb, stride_vs, qk_scale,
                 DK: tl.constexpr, DV: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr,
                 DV_PAD: tl.constexpr, V_IS_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr,
                 MASK: tl.constexpr):
    """One step of the online softmax over keys j*BLOCK_N.. (MASK: the causal and end-of-sequence masks apply)."""
    k_pos = j * BLOCK_N + tl.arange(0, BLOCK_N)
    k_ok = k_pos < kv_end
    if MASK:  # past the sequence end the block table may hold anything: read page 0 there, masked
        page = tl.load(bt_row + k_pos // BLOCK_SIZE, mask=k_ok, other=0).to(tl.int64)
    else:
        page = tl.load(bt_row + k_pos // BLOCK_SIZE).to(tl.int64)
    slot = (k_pos % BLOCK_SIZE).to(tl.int64)
    k_row = k_base + page * stride_kb + slot * stride_ks  # [BLOCK_N] row pointers
    k_main = _load_rows(k_row, k_ok, 0, D_MAIN, DK, MASK)  # [BLOCK_N, D_MAIN]
    s = tl.dot(q_main, tl.trans(k_main))
    if D_TAIL > 0:  # MLA's rope channels (576 = 512 + 64) as a second dot instead of padding it all to 1024
        k_tail = _load_rows(k_row, k_ok, D_MAIN, D_TAIL, DK, MASK)
        s = tl.dot(q_tail, tl.trans(k_tail), s)
    s = s * qk_scale
    if MASK:
        s = tl.where((k_pos[None, :] <= q_pos[:, None]) & k_ok[None, :], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with no key yet (split ranges, empty rows)
    alpha = tl.math.exp2(m_i - m_use)
    p = tl.math.exp2(s - m_use[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    if V_IS_K:  # MLA: the value is the first Dv channels of the key tile already loaded
        v = k_main
    else:
        v = _load_rows(v_base + page * stride_vb + slot * stride_vs, k_ok, 0, DV_PAD, DV, MASK)  # [BLOCK_N, DV_PAD]
    acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
    return acc, l_i, m_new


# batch-dependent ints: Triton would otherwise compile a variant per (== 1, % 16 == 0, other) of each, and a
# step whose batch shape is new (a serving step mixing decodes with a prefill chunk) would pay a compile
@triton.jit(do_not_specialize=["num_seqs", "bsearch_steps", "num_splits"])
def _paged_attention_kernel(
        q_ptr, k_ptr, v_ptr, out_ptr, part_out_ptr, part_lse_ptr, count_ptr, cu_ptr, seq_lens_ptr, bt_ptr,
        qk_scale, num_seqs, bsearch_steps, num_heads, num_splits,
        stride_qt, stride_qh, stride_kb, stride_ks, stride_kh, stride_vb, stride_vs, stride_vh,
        stride_ot, stride_oh, stride_bt,
        DK: tl.constexpr, DV: tl.constexpr, D_MAIN: tl.constexpr, D_TAIL: tl.constexpr, DV_PAD: tl.constexpr,
        V_IS_K: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HPP: tl.constexpr,
        NUM_HCHUNK: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
        BLOCK_SIZE: tl.constexpr, ONE_TILE_PER_SEQ: tl.constexpr, SPLIT: tl.constexpr,
        FUSE_REDUCE: tl.constexpr = False, SPLITS_PAD: tl.constexpr = 16, USE_PDL: tl.constexpr = False):
    """Program (query tile x KV head x head chunk, key split): rows = BLOCK_Q tokens x HPP heads of one KV head.
    The heads of one tile are neighbours in the grid, so programs running together read the same cache pages.
    The step's metadata (cu_seqlens, seq_lens: copied in before any kernel of the step) is read before waiting for
    the kernel in front; q and the caches after. FUSE_REDUCE: the program's last key split to arrive (an acq_rel
    counter per grid row, reset afterwards) combines the splits' partials as _split_reduce_kernel does, so no
    reduce launch follows."""
    pid = tl.program_id(0) // (KV_HEADS * NUM_HCHUNK)
    kv_head = tl.program_id(0) % (KV_HEADS * NUM_HCHUNK) // NUM_HCHUNK
    h0 = tl.program_id(0) % NUM_HCHUNK * HPP
    split = tl.program_id(1)
    if ONE_TILE_PER_SEQ:
        b = pid
        tile = 0
    else:  # sequence b owns tiles [cu[b] // BLOCK_Q + b, cu[b+1] // BLOCK_Q + b + 1): binary search on the start
        lo = pid * 0
        hi = lo + num_seqs
        for _ in range(bsearch_steps):
            mid = (lo + hi) // 2
            ok = tl.load(cu_ptr + mid) // BLOCK_Q + mid <= pid
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        b = lo
    q_start = tl.load(cu_ptr + b)
    q_len = tl.load(cu_ptr + b + 1) - q_start
    if ONE_TILE_PER_SEQ:
        if q_len <= 0:  # waits all the same: a launch whose programs all exit must still complete after the one
            gdc_prologue(USE_PDL)  # in front, or the kernel behind it would not wait for that one
            return
    else:  # the last (longest causal) tiles of a sequence run first: less of a tail at the end of the grid
        n_q_tiles = (q_len + BLOCK_Q - 1) // BLOCK_Q
        idx = pid - (q_start // BLOCK_Q + b)
        if idx >= n_q_tiles:
            gdc_prologue(USE_PDL)
            return
        tile = n_q_tiles - 1 - idx
    seq_len = tl.load(seq_lens_ptr + b)
    ctx_len = seq_len - q_len  # position of the sequence's first query
    gdc_prologue(USE_PDL)

    rows = tl.arange(0, BLOCK_M)
    tok = tile * BLOCK_Q + rows // HPP
    hh = h0 + rows % HPP
    row_ok = (rows < BLOCK_Q * HPP) & (tok < q_len) & (hh < GROUP)
    head = kv_head * GROUP + hh
    t = (q_start + tok).to(tl.int64)
    q_pos = ctx_len + tl.minimum(tok, q_len - 1)  # padded rows copy the last query's position (no empty rows)
    q_row = q_ptr + t * stride_qt + head * stride_qh
    d = tl.arange(0, D_MAIN)
    q_main = tl.load(q_row[:, None] + d[None, :], mask=row_ok[:, None] & (d[None, :] < DK), other=0.0)
    if D_TAIL > 0:
        dt = D_MAIN + tl.arange(0, D_TAIL)
        q_tail = tl.load(q_row[:, None] + dt[None, :], mask=row_ok[:, None] & (dt[None, :] < DK), other=0.0)
    else:
        q_tail = q_main

    # keys this tile needs: 0 .. its last query's position; tiles below its first query need no causal mask
    last = tl.minimum((tile + 1) * BLOCK_Q, q_len)
    kv_end = tl.maximum(tl.minimum(ctx_len + last, seq_len), 0)
    n_tiles = (kv_end + BLOCK_N - 1) // BLOCK_N
    n_full = tl.maximum(ctx_len + tile * BLOCK_Q + 1, 0) // BLOCK_N
    if SPLIT:
        per = (n_tiles + num_splits - 1) // num_splits
        j0 = split * per
        j1 = tl.minimum(j0 + per, n_tiles)
    else:
        j0 = 0
        j1 = n_tiles
    bt_row = bt_ptr + b.to(tl.int64) * stride_bt
    k_base = k_ptr + kv_head * stride_kh
    v_base = v_ptr + kv_head * stride_vh
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
    for j in range(j0, tl.minimum(j1, n_full)):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q_main, q_tail, q_pos, j, kv_end, bt_row, k_base, v_base,
                                     stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, DK, DV, D_MAIN, D_TAIL,
                                     DV_PAD, V_IS_K, BLOCK_N, BLOCK_SIZE, False)
    for j in range(tl.maximum(j0, n_full), j1):
        acc, l_i, m_i = _attend_tile(acc, l_i, m_i, q_main, q_tail, q_pos, j, kv_end, bt_row, k_base, v_base,
                                     stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, DK, DV, D_MAIN, D_TAIL,
                                     DV_PAD, V_IS_K, BLOCK_N, BLOCK_SIZE, True)

    dv = tl.arange(0, DV_PAD)
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    out = acc / l_safe[:, None]  # no key at all (seq_len 0, an empty split): zeros
    if SPLIT:  # partial result and its log2-sum-exp; an empty split writes lse = -inf and zeros
        lse = tl.where(l_i == 0.0, float("-inf"), m_i + tl.math.log2(l_safe))
        part = (t * num_heads + head) * num_splits + split
        tl.store(part_lse_ptr + part, lse, mask=row_ok)
        tl.store(part_out_ptr + part[:, None] * DV_PAD + dv[None, :], out, mask=row_ok[:, None])
        if FUSE_REDUCE:
            tl.debug_barrier()  # every thread's partial stores before the release below
            arrived = tl.atomic_add(count_ptr + tl.program_id(0), 1, sem="acq_rel")
            if arrived == num_splits - 1:
                base = (t * num_heads + head) * num_splits  # [BLOCK_M]
                sp = tl.arange(0, SPLITS_PAD)
                lse_all = tl.load(part_lse_ptr + base[:, None] + sp[None, :],
                                  mask=row_ok[:, None] & (sp[None, :] < num_splits), other=float("-inf"),
                                  cache_modifier=".cg")
                m = tl.max(lse_all, 1)
                m = tl.where(m == float("-inf"), 0.0, m)
                total = tl.sum(tl.math.exp2(lse_all - m[:, None]), 1)
                acc = tl.zeros([BLOCK_M, DV_PAD], tl.float32)
                for i in tl.static_range(SPLITS_PAD):  # all loads at once, summed in split order
                    ok = row_ok & (i < num_splits)
                    lse_i = tl.load(part_lse_ptr + base + i, mask=ok, other=float("-inf"), cache_modifier=".cg")
                    acc += tl.math.exp2(lse_i - m)[:, None] * tl.load(
                        part_out_ptr + (base + i)[:, None] * DV_PAD + dv[None, :], mask=ok[:, None], other=0.0,
                        cache_modifier=".cg")
                out = acc / tl.where(total == 0.0, 1.0, total)[:, None]
                o_ptr = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :]
                tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))
                tl.store(count_ptr + tl.program_id(0), 0)
    else:
        o_ptr = out_ptr + t[:, None] * stride_ot + head[:, None] * stride_oh + dv[None, :]
        tl.store(o_ptr, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & (dv[None, :] < DV))


@triton.jit
def _split_reduce_kernel(part_out_ptr, part_lse_ptr, out_ptr, num_heads, num_splits, stride_ot, stride_oh,
                         DV: tl.constexpr, DV_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
                         UNROLL: tl.constexpr = False, USE_PDL: tl.constexpr = False):
    """Program (token, head): combine the key splits' partial outputs weighted by their softmax mass."""
    gdc_prologue(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    base = (t * num_heads + h) * num_splits
    s = tl.arange(0, SPLITS_PAD)
    lse = tl.load(part_lse_ptr + base + s, mask=s < num_splits, other=float("-inf"))
    m = tl.max(lse, 0)
    m = tl.where(m == float("-inf"), 0.0, m)
    total = tl.sum(tl.math.exp2(lse - m), 0)
    dv = tl.arange(0, DV_PAD)
    acc = tl.zeros([DV_PAD], tl.float32)
    if UNROLL:  # few splits of a narrow Dv: all loads issued at once, summed in registers in split order (H200: OLMoE
        # 8 splits 5.2 -> 4.8 us; MLA's 512-wide partials got slower unrolled, 7.3 -> 7.7 us, and keep the loop)
        for i in tl.static_range(SPLITS_PAD):
            ok = i < num_splits
            lse_i = tl.load(part_lse_ptr + base + i, mask=ok, other=float("-inf"))
            acc += tl.math.exp2(lse_i - m) * tl.load(part_out_ptr + (base + i) * DV_PAD + dv, mask=ok, other=0.0)
    else:
        for i in range(num_splits):
            lse_i = tl.load(part_lse_ptr + base + i)
            acc += tl.math.exp2(lse_i - m) * tl.load(part_out_ptr + (base + i) * DV_PAD + dv)
    out = acc / tl.where(total == 0.0, 1.0, total)
    tl.store(out_ptr + t * stride_ot + h * stride_oh + dv, out.to(out_ptr.dtype.element_ty), mask=dv < DV)


def _pow2(x: int) -> int:
    return max(16, triton.next_power_of_2(x))


def default_config(max_query_len: int, group: int, dk: int, dv: int, num_seqs_x_kv: int = 0,
                   num_sms: int = 132) -> PagedAttentionConfig:
    """Launch shape from host ints only, picked from H100 sweeps (scripts/bench_attention_gpu.py --sweep).
    Decode rows per program are capped so that the fp32 accumulator [rows, Dv] fits in registers. A decode grid of
    fewer programs than SMs has its keys split (num_kv_splits) and takes 32-key steps (H200 sweep, docs/perf/
    engine.md v5); one of one to two programs per SM, unsplit, takes 64-key steps: more bytes in flight per
    program."""
    dv_pad = _pow2(dv)
    big = dk > 256
    row_cap = max(16, min(128, 16384 // dv_pad))
    if max_query_len <= 1:  # decode: all heads of a KV head share each key load (the group is the dot's M)
        hpp = min(group, row_cap)
        if big:
            return PagedAttentionConfig(1, hpp, 32, 4, 2)
        programs = num_seqs_x_kv * triton.cdiv(group, hpp)
        if group == 1 and programs >= 16 * num_sms:  # MHA, many programs: small ones, more resident per SM (H200
            return PagedAttentionConfig(1, 1, 32, 2, 2)  # sweeps, docs/perf/engine.md v3: OLMoE B=256 -17 %)
        if group == 1 and programs >= 4 * num_sms:  # (OLMoE B=64: -15 %)
            return PagedAttentionConfig(1, 1, 16, 1, 4)
        return PagedAttentionConfig(1, hpp, 64 if num_sms <= programs < 2 * num_sms else 32, 4, 3)
    hpp = min(group, 64)  # prefill: 64 rows of (token, head) pairs
    block_q = min(max(1, 64 // hpp), triton.next_power_of_2(max_query_len))
    return PagedAttentionConfig(block_q, hpp, 32 if big else 64, 8 if big else 4, 2 if big else 3)


def num_kv_splits(num_programs: int, max_seq_len: int, device: torch.device) -> int:
    """Key splits for a decode grid of `num_programs` (sequences x KV heads x head chunks): none once the grid
    fills the SMs, else enough for about TARGET_WAVES programs per SM, each split covering >= MIN_KEYS_PER_SPLIT
    keys of max_seq_len -- or, for short max_seq_len, up to SHORT_SPLITS splits of >= 32 keys (H200 sweep at B=1
    with 150-token contexts: OLMoE 7.5 -> 5.2 us, MLA 9.8 -> 7.2 us; docs/perf/engine.md v5). Under CUDA graphs
    max_seq_len is max_model_len, so the count cannot follow the actual contexts."""
    if num_programs >= num_sms(device):
        return 1
    want = TARGET_WAVES * num_sms(device) // num_programs  # rounded down: a last, mostly empty wave costs a wave
    by_len = max(triton.cdiv(max_seq_len, MIN_KEYS_PER_SPLIT), min(SHORT_SPLITS, triton.cdiv(max_seq_len, 32)))
    return max(1, min(want, by_len, MAX_SPLITS))


def value_is_key_prefix(k_cache: torch.Tensor, v_cache: torch.Tensor) -> bool:
    """True when v_cache[n, s, h] is the first Dv channels of k_cache[n, s, h] (MLA's latent cache)."""
    same_rows = all(v_cache.stride(i) == k_cache.stride(i) for i in range(3) if v_cache.shape[i] > 1)
    return v_cache.data_ptr() == k_cache.data_ptr() and same_rows and v_cache.shape[3] <= k_cache.shape[3]


def _check(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
           seq_lens: torch.Tensor, block_tables: torch.Tensor) -> None:
    if q.dim() != 3 or k_cache.dim() != 4 or v_cache.dim() != 4:
        raise ValueError(f"expected q [T, H, Dk], k/v cache [N, bs, KV, D]; got {tuple(q.shape)}, "
                         f"{tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if k_cache.shape[:3] != v_cache.shape[:3] or q.shape[2] != k_cache.shape[3]:
        raise ValueError(f"shape mismatch: q {tuple(q.shape)}, k {tuple(k_cache.shape)}, v {tuple(v_cache.shape)}")
    if q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"query heads {q.shape[1]} not a multiple of KV heads {k_cache.shape[2]}")
    if q.dtype != k_cache.dtype or q.dtype != v_cache.dtype:
        raise ValueError(f"dtype mismatch: q {q.dtype}, k {k_cache.dtype}, v {v_cache.dtype}")
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must be contiguous in its last dim, strides {t.stride()}")
    B = seq_lens.shape[0]
    for name, t, shape in (("cu_seqlens_q", cu_seqlens_q, (B + 1,)), ("seq_lens", seq_lens, (B,))):
        if t.dtype != torch.int32 or tuple(t.shape) != shape or t.stride(0) != 1:
            raise ValueError(f"{name} must be contiguous int32 {list(shape)}, got {t.dtype} {tuple(t.shape)}")
    if block_tables.dtype != torch.int32 or block_tables.dim() != 2 or block_tables.shape[0] != B \
            or block_tables.stride(1) != 1:
        raise ValueError(f"block_tables must be int32 [B={B}, max_blocks] with unit last stride, got "
                         f"{block_tables.dtype} {tuple(block_tables.shape)} strides {block_tables.stride()}")
    devices = {t.device for t in (q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {devices}")


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                    seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float, max_query_len: int,
                    out: torch.Tensor | None = None, *, max_seq_len: int | None = None, num_splits: int | None = None,
                    config: PagedAttentionConfig | None = None) -> torch.Tensor:
    """Causal attention of this step's queries over the paged cache; returns out [T, H, Dv] in q's dtype.

    q [T, H, Dk] packed by cu_seqlens_q [B+1] int32; k_cache [N, bs, KV, Dk], v_cache [N, bs, KV, Dv] (any strides
    but a unit last one; v_cache may view k_cache's storage, as MLA's latent[..., :Dv] does, and is then not read
    again); seq_lens [B] int32 = KV length including this step; block_tables [B, max_blocks] int32. max_query_len
    (host int, >= every qlen; 1 at decode) and max_seq_len (host int, >= every seq_len; default max_blocks * bs)
    size the grid: nothing is read back from the device, so the call can be captured in a CUDA graph. Rows of q
    not covered by cu_seqlens_q are left as they are (garbage after a split decode). num_splits / config override
    the host-side choice of key splits and launch shape (tuning, tests).
    """
    _check(q, k_cache, v_cache, cu_seqlens_q, seq_lens, block_tables)
    T, H, Dk = q.shape
    _, bs, KV, Dv = v_cache.shape
    B = seq_lens.shape[0]
    group = H // KV
    if out is None:
        out = q.new_empty(T, H, Dv)
    elif out.shape != (T, H, Dv) or out.dtype != q.dtype or out.stride(-1) != 1 or out.device != q.device:
        raise ValueError(f"out must be {q.dtype} [{T}, {H}, {Dv}] with unit last stride, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if T == 0 or B == 0:
        return out
    cfg = config or default_config(max_query_len, group, Dk, Dv, B * KV, num_sms(q.device))
    d_main = max(16, 1 << (Dk.bit_length() - 1))
    d_tail = _pow2(Dk - d_main) if Dk > d_main else 0
    dv_pad = _pow2(Dv)
    v_is_k = value_is_key_prefix(k_cache, v_cache) and dv_pad == d_main
    n_hchunk = triton.cdiv(group, cfg.heads_per_prog)
    block_m = _pow2(cfg.block_q * cfg.heads_per_prog)
    one_tile = max_query_len <= cfg.block_q
    n_tiles = B if one_tile else T // cfg.block_q + B  # >= sum over b of cdiv(qlen_b, block_q)
    if num_splits is None:
        num_splits = 1
        if one_tile:
            num_splits = num_kv_splits(B * KV * n_hchunk, max_seq_len or block_tables.shape[1] * bs, q.device)
    split = num_splits > 1
    grid_rows = n_tiles * KV * n_hchunk
    fuse = split and _fuse_reduce and _pow2(num_splits) <= 16 and dv_pad <= 128 and grid_rows <= MAX_FUSED_ROWS
    part_out = part_lse = count = out  # unused without splits
    if split:
        part_out = torch.empty(T, H, num_splits, dv_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(T, H, num_splits, dtype=torch.float32, device=q.device)
    if fuse:
        count = arrival_counters("paged_attention", MAX_FUSED_ROWS, q.device)
    _paged_attention_kernel[(grid_rows, num_splits)](
        q, k_cache, v_cache, out, part_out, part_lse, count, cu_seqlens_q, seq_lens, block_tables,
        scale * LOG2E, B, max(0, math.ceil(math.log2(B))), H, num_splits,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), out.stride(0), out.stride(1), block_tables.stride(0),
        DK=Dk, DV=Dv, D_MAIN=d_main, D_TAIL=d_tail, DV_PAD=dv_pad, V_IS_K=v_is_k, KV_HEADS=KV, GROUP=group,
        HPP=cfg.heads_per_prog, NUM_HCHUNK=n_hchunk, BLOCK_Q=cfg.block_q, BLOCK_M=block_m, BLOCK_N=cfg.block_n,
        BLOCK_SIZE=bs, ONE_TILE_PER_SEQ=one_tile, SPLIT=split, FUSE_REDUCE=fuse, SPLITS_PAD=_pow2(num_splits),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(q.device))
    if split and not fuse:
        _split_reduce_kernel[(T, H)](part_out, part_lse, out, H, num_splits, out.stride(0), out.stride(1),
                                     DV=Dv, DV_PAD=dv_pad, SPLITS_PAD=_pow2(num_splits),
                                     UNROLL=_pow2(num_splits) <= 16 and dv_pad <= 128, num_warps=4,
                                     **launch_options(q.device))
    return out


def paged_attention_ref(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cu_seqlens_q: torch.Tensor,
                        seq_lens: torch.Tensor, block_tables: torch.Tensor, scale: float) -> torch.Tensor:
    """The oracle: same arguments and convention as `paged_attention`, float32 math, one sequence at a time
    (reads cu_seqlens_q and seq_lens back to the host). A query with no key gets zeros."""
    T, H, _ = q.shape
    _, bs, KV, Dv = v_cache.shape
    out = q.new_zeros(T, H, Dv)
    cu, lens = cu_seqlens_q.tolist(), seq_lens.tolist()
    for b, n in enumerate(lens):
        s, e = cu[b], cu[b + 1]
        if e == s:
            continue
        pos = torch.arange(n, device=q.device)
        blocks, slots = block_tables[b, pos // bs].long(), pos % bs
        k = k_cache[blocks, slots].float().repeat_interleave(H // KV, dim=1)  # [n, H, Dk]
        v = v_cache[blocks, slots].float().repeat_interleave(H // KV, dim=1)  # [n, H, Dv]
        q_pos = n - (e - s) + torch.arange(e - s, device=q.device)
        scores = torch.einsum("qhd,khd->hqk", q[s:e].float(), k) * scale
        scores = scores.masked_fill(pos[None, None, :] > q_pos[None, :, None], float("-inf"))
        p = scores.softmax(-1).nan_to_num(0.0)  # [H, qlen, n]
        out[s:e] = torch.einsum("hqk,khd->qhd", p, v).to(q.dtype)
    return out
