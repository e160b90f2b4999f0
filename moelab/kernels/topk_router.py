"""Top-k routing of softmax or sigmoid scores in one Triton kernel (one program per token), with
`topk_router_ref` beside it; `router_topk` also computes the router logits (x W^T) in the same kernel.

scores = softmax(logits) or sigmoid(logits) over the E experts; the K largest are taken one after the other (ties
go to the lower expert id), optionally renormalized to sum to 1, then multiplied by `scale`. This replaces
softmax + topk (which itself is a gather and a sort) + renorm + scale: four to six launches per MoE layer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.counters import arrival_counters
from moelab.kernels.pdl import early_reads, gdc_prologue, launch_options


@triton.jit
def _select_topk(x, offs, mask, K: tl.constexpr, KP: tl.constexpr, BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr,
                 RENORM: tl.constexpr):
    """x [rows, BLOCK_E] float32 logits (masked columns -inf) -> (weights [rows, KP], ids [rows, KP] int64)."""
    if SIGMOID:
        p = 1.0 / (1.0 + tl.exp(-x))
    else:
        e = tl.exp(x - tl.max(x, axis=1)[:, None])
        p = e / tl.sum(e, axis=1)[:, None]
    p = tl.where(mask[None, :], p, -1.0)
    kk = tl.arange(0, KP)[None, :]
    wv = tl.zeros([x.shape[0], KP], dtype=tl.float32)
    iv = tl.zeros([x.shape[0], KP], dtype=tl.int64)
    for k in tl.static_range(K):
        m = tl.max(p, axis=1)
        idx = tl.min(tl.where(p == m[:, None], offs[None, :], BLOCK_E), axis=1)
        wv = tl.where(kk == k, m[:, None], wv)
        iv = tl.where(kk == k, idx.to(tl.int64)[:, None], iv)
        p = tl.where(offs[None, :] == idx[:, None], -2.0, p)
    if RENORM:
        wv = wv / (tl.sum(wv, axis=1)[:, None] + 1e-20)
    return wv, iv


@triton.jit
def _topk_router_kernel(logits_ptr, w_ptr, ids_ptr, E, stride_l, scale, K: tl.constexpr, KP: tl.constexpr,
                        BLOCK_E: tl.constexpr, SIGMOID: tl.constexpr, RENORM: tl.constexpr,
                        USE_PDL: tl.constexpr = False):
    gdc_prologue(USE_PDL)
    t = tl.program_id(0)
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    x = tl.load(logits_ptr + t * stride_l + offs[None, :], mask=mask[None, :], other=-float("inf")).to(tl.float32)
    wv, iv = _select_topk(x, offs, mask, K, KP, BLOCK_E, SIGMOID, RENORM)
    kk = tl.arange(0, KP)[None, :]
    tl.store(w_ptr + t * K + kk, wv * scale, mask=kk < K)
    tl.store(ids_ptr + t * K + kk, iv, mask=kk < K)


@triton.jit
def _r_nw_chunk(x_ptrs, ok, c_off, r_ptr, nw_ptr, BLOCK_D: tl.constexpr):
    """The residual and norm-weight chunks that _x_chunk adds and multiplies (row 0's columns c_off..)."""
    d = tl.broadcast_to(c_off + tl.arange(0, BLOCK_D)[None, :], x_ptrs.shape)  # row 0's columns (rows > 0 masked)
    return tl.load(r_ptr + d, mask=ok, other=0.0), tl.load(nw_ptr + d, mask=ok, other=0.0)


@triton.jit
def _x_chunk(x_ptrs, ok, c_off, r_ptr, nw_ptr, y_ptr, s_ptr, inv, ADD_NORM: tl.constexpr, BLOCK_D: tl.constexpr,
             rv=None, nw=None, HAVE_R: tl.constexpr = False):
    """The [BLOCK_T, BLOCK_D] chunk of the router's input at columns c_off..: x itself, or (ADD_NORM, one row)
    rms_norm(x + r) computed and rounded as _add_rms_norm_kernel does, its chunk of y and of the sum x + r stored.
    HAVE_R: rv and nw are that chunk's residual and norm weight, already loaded."""
    xv = tl.load(x_ptrs, mask=ok, other=0.0)
    if ADD_NORM:
        d = tl.broadcast_to(c_off + tl.arange(0, BLOCK_D)[None, :], x_ptrs.shape)
        if not HAVE_R:
            rv, nw = _r_nw_chunk(x_ptrs, ok, c_off, r_ptr, nw_ptr, BLOCK_D)
        summed = (xv.to(tl.float32) + rv.to(tl.float32)).to(s_ptr.dtype.element_ty)
        tl.store(s_ptr + d, summed, mask=ok)
        xv = ((summed.to(tl.float32) * inv).to(y_ptr.dtype.element_ty) * nw).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + d, xv, mask=ok)
    return xv


@triton.jit(do_not_specialize=["T", "num_splits", "chunks_per_split"])
def _router_gemm_topk_kernel(x_ptr, rw_ptr, part_ptr, count_ptr, w_ptr, ids_ptr, r_ptr, nw_ptr, y_ptr, s_ptr, eps,
                             T, E, D, stride_x, stride_rw,
                             scale, num_splits, chunks_per_split, K: tl.constexpr, KP: tl.constexpr,
                             BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr,
                             SIGMOID: tl.constexpr, RENORM: tl.constexpr, PRECISION: tl.constexpr,
                             SPLIT: tl.constexpr, MAX_SPLITS: tl.constexpr = 16, ADD_NORM: tl.constexpr = False,
                             D_PAD: tl.constexpr = 16, EARLY_R: tl.constexpr = False, EXTRA: tl.constexpr = False,
                             xo_ptr=None, USE_PDL: tl.constexpr = False):
    """Program (row block, split): logits of rows t0..t0+BLOCK_T over the split's D chunks, x W^T accumulated in
    float32 (products of bf16/fp16 inputs are exact in float32, so this is the reference's x.float() @
    W.float()^T up to summation order). SPLIT: each split stores its partial logits, and the row block's last
    split to arrive (an acq_rel counter, reset afterwards) sums them in split order and does the top-k, so at
    decode the weight read spreads over num_splits SMs and the result does not depend on timing.
    ADD_NORM (T == 1): the input is rms_norm(x + r) * nw, the add_rms_norm in front folded in; every split
    computes the row's RMS from the whole row (D_PAD wide) and writes its own chunks of y and of x + r. EARLY_R:
    r (written at least two launches earlier, the caller promises) and the norm weight of the split's first chunk
    are read before the PDL wait, the whole residual row too. EXTRA: rw holds one more row after the E experts' (a
    shared expert's gate): its product with x (the logit, rounded to x's dtype) goes to xo[t], outside the top-k."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    t_ok = t < T
    offs = tl.arange(0, BLOCK_E)
    mask = offs < E
    wmask = offs < E + EXTRA  # the weight rows read: the experts' and the extra one
    d = tl.arange(0, BLOCK_D)
    c0 = split * chunks_per_split
    x_ptrs = x_ptr + t.to(tl.int64)[:, None] * stride_x + c0 * BLOCK_D + d[None, :]
    w_ptrs = rw_ptr + offs[None, :] * stride_rw + c0 * BLOCK_D + d[:, None]
    # the first weight chunk (a split never starts past D) is read before waiting for the norm in front: no kernel
    # writes the router weight
    w0 = tl.load(w_ptrs, mask=wmask[None, :] & (d < D - c0 * BLOCK_D)[:, None], other=0.0)
    ok0 = t_ok[:, None] & (d < D - c0 * BLOCK_D)[None, :]
    if ADD_NORM:
        cols = tl.arange(0, D_PAD)
    if EARLY_R:
        ra = tl.load(r_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        rv0, nw0 = _r_nw_chunk(x_ptrs, ok0, c0 * BLOCK_D, r_ptr, nw_ptr, BLOCK_D)
    else:
        rv0 = w0
        nw0 = w0
    gdc_prologue(USE_PDL)
    inv = 1.0
    if ADD_NORM:  # the one row's RMS, summed over the whole row as _add_rms_norm_kernel sums it
        xa = tl.load(x_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        if not EARLY_R:
            ra = tl.load(r_ptr + cols, mask=cols < D, other=0.0).to(tl.float32)
        v = (xa + ra).to(s_ptr.dtype.element_ty).to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(v * v, axis=0) / D + eps)
    x0 = _x_chunk(x_ptrs, ok0, c0 * BLOCK_D, r_ptr, nw_ptr, y_ptr, s_ptr, inv, ADD_NORM, BLOCK_D, rv0, nw0, EARLY_R)
    acc = tl.dot(x0, w0, tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32), input_precision=PRECISION)
    x_ptrs += BLOCK_D
    w_ptrs += BLOCK_D
    for c in range(c0 + 1, tl.minimum(c0 + chunks_per_split, tl.cdiv(D, BLOCK_D))):
        d_ok = d < D - c * BLOCK_D
        xv = _x_chunk(x_ptrs, t_ok[:, None] & d_ok[None, :], c * BLOCK_D, r_ptr, nw_ptr, y_ptr, s_ptr, inv,
                      ADD_NORM, BLOCK_D)
        wv = tl.load(w_ptrs, mask=wmask[None, :] & d_ok[:, None], other=0.0)
        acc = tl.dot(xv, wv, acc, input_precision=PRECISION)
        x_ptrs += BLOCK_D
        w_ptrs += BLOCK_D
    last = True
    if SPLIT:
        t_pad = tl.num_programs(0) * BLOCK_T
        cell = t[:, None] * BLOCK_E + offs[None, :]
        tl.store(part_ptr + split * t_pad * BLOCK_E + cell, acc)
        tl.debug_barrier()  # every thread's partial stores before the release below
        arrived = tl.atomic_add(count_ptr + pid_t, 1, sem="acq_rel")
        last = arrived == num_splits - 1
        if last:  # all MAX_SPLITS partial loads issued at once (a loop of num_splits trips waited for each)
            acc = tl.zeros([BLOCK_T, BLOCK_E], dtype=tl.float32)
            for i in tl.static_range(MAX_SPLITS):
                acc += tl.load(part_ptr + i * t_pad * BLOCK_E + cell, mask=i < num_splits, other=0.0,
                               cache_modifier=".cg")
            tl.store(count_ptr + pid_t, 0)
    if last:
        if EXTRA:
            xo = tl.sum(tl.where(offs[None, :] == E, acc, 0.0), axis=1)
            tl.store(xo_ptr + t, xo.to(xo_ptr.dtype.element_ty), mask=t_ok)
        acc = tl.where(mask[None, :], acc, -float("inf"))
        wv, iv = _select_topk(acc, offs, mask, K, KP, BLOCK_E, SIGMOID, RENORM)
        kk = tl.arange(0, KP)[None, :]
        out = t.to(tl.int64)[:, None] * K + kk
        ok = t_ok[:, None] & (kk < K)
        tl.store(w_ptr + out, wv * scale, mask=ok)
        tl.store(ids_ptr + out, iv, mask=ok)


_NORM_FOLD = True  # the decoder folds a one-row post-attention norm into the router (add_norm_router_topk)
MAX_SPLITS = 16
SPLIT_MAX_ROW_BLOCKS = 32  # split D only while the row blocks alone leave most SMs idle (T <= 512)
_SHAPE = {"splits": MAX_SPLITS, "warps": 4}  # launch-shape sweeps (set_split_shape)


def set_split_shape(splits: int = MAX_SPLITS, warps: int = 4) -> None:
    """At most `splits` programs over D per row block (1..MAX_SPLITS) and `warps` warps each (launch-shape sweeps;
    CUDA graphs must be recaptured)."""
    if not 1 <= splits <= MAX_SPLITS or warps not in (1, 2, 4, 8):
        raise ValueError(f"splits must be in 1..{MAX_SPLITS} and warps in 1, 2, 4, 8; got {splits}, {warps}")
    _SHAPE.update(splits=splits, warps=warps)


def set_norm_fold(on: bool) -> None:
    """Let the decoder fold a one-row post-attention add_rms_norm into the router kernel (A/B timings; CUDA graphs
    must be recaptured)."""
    global _NORM_FOLD
    _NORM_FOLD = bool(on)


def norm_fold_enabled() -> bool:
    return _NORM_FOLD


def _check_route(scoring: str, top_k: int, E: int) -> None:
    if scoring not in ("softmax", "sigmoid"):
        raise ValueError(f"scoring {scoring!r}; allowed: softmax, sigmoid")
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must be in [1, {E}], got {top_k}")


def router_topk(x: torch.Tensor, weight: torch.Tensor, top_k: int, scoring: str = "softmax",
                renormalize: bool = False, scale: float = 1.0, extra_row: bool = False) -> tuple[torch.Tensor, ...]:
    """The router GEMM and the top-k in one kernel: x [T, D], weight [E, D] (same dtype) -> (weights [T, K]
    float32, ids [T, K] int64), as topk_router(x.float() @ weight.float().T, ...). extra_row: weight is [E + 1, D],
    its last row outside the routing (Qwen2-MoE's shared-expert gate); its logits x @ row come back third, [T, 1]
    in x's dtype (one GEMV launch fewer)."""
    return _launch(x, weight, top_k, scoring, renormalize, scale, extra_row=extra_row)


def add_norm_router_topk(x: torch.Tensor, residual: torch.Tensor, norm_weight: torch.Tensor, eps: float,
                         weight: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                         scale: float = 1.0, residual_settled: bool = False, extra_row: bool = False
                         ) -> tuple[torch.Tensor, ...]:
    """One row: add_rms_norm(x, residual, norm_weight, eps) and router_topk of its output in one kernel ->
    (y = rms_norm(x + residual) [1, D], x + residual [1, D], weights [1, K], ids [1, K]), each as the two kernels
    would give them at the same launch shape (add_rms_norm's one-row default of 16 warps sums the squares in another
    order: y within a bf16 rounding); the decode step's post-attention norm and router at batch 1, one launch fewer
    per layer.
    residual_settled: as add_rms_norm's (residual written at least two launches before; read before the wait).
    extra_row: as router_topk's; the extra logits [1, 1] come back fifth. (The engine's Qwen2-MoE one-row step does
    not use it: there it measured slower than the gate's own GEMV, docs/perf/engine.md v11.)"""
    if x.shape[0] != 1 or x.dim() != 2 or residual.shape != x.shape or residual.dtype != x.dtype:
        raise ValueError(f"add_norm_router_topk takes one row: x and residual [1, D] of one dtype, got "
                         f"{tuple(x.shape)} {x.dtype} and {tuple(residual.shape)} {residual.dtype}")
    if norm_weight.shape != (x.shape[1],) or norm_weight.device != x.device:
        raise ValueError(f"norm weight must be [{x.shape[1]}] on {x.device}, got {tuple(norm_weight.shape)} on "
                         f"{norm_weight.device}")
    y, summed = torch.empty_like(x, memory_format=torch.contiguous_format), torch.empty_like(
        x, memory_format=torch.contiguous_format)
    if not (residual.is_contiguous() and norm_weight.is_contiguous()):  # a copy would be the launch in front
        residual, norm_weight, residual_settled = residual.contiguous(), norm_weight.contiguous(), False
    out = _launch(x, weight, top_k, scoring, renormalize, scale, (residual, norm_weight, y, summed, eps),
                  early_r=residual_settled and early_reads(), extra_row=extra_row)
    return (y, summed, *out)


def _launch(x: torch.Tensor, weight: torch.Tensor, top_k: int, scoring: str, renormalize: bool, scale: float,
            norm: tuple | None = None, early_r: bool = False, extra_row: bool = False) -> tuple[torch.Tensor, ...]:
    T, D = x.shape
    E = weight.shape[0] - extra_row
    _check_route(scoring, top_k, E)
    if weight.shape[1] != D or weight.dtype != x.dtype:
        raise ValueError(f"router weight must be [E, {D}] in {x.dtype}, got {tuple(weight.shape)} {weight.dtype}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    if weight.stride(-1) != 1:
        weight = weight.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=x.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=x.device)
    xo = torch.empty(T, 1, dtype=x.dtype, device=x.device) if extra_row else None
    if T:
        block_e = max(16, triton.next_power_of_2(E + extra_row))
        block_d = max(16, min(128, 8192 // block_e))
        row_blocks, chunks = triton.cdiv(T, 16), triton.cdiv(D, block_d)
        splits = min(_SHAPE["splits"], chunks) if row_blocks <= SPLIT_MAX_ROW_BLOCKS else 1
        per = triton.cdiv(chunks, splits)
        splits = triton.cdiv(chunks, per)  # no empty split
        part = torch.empty(splits * row_blocks * 16 * block_e if splits > 1 else 1, dtype=torch.float32,
                           device=x.device)
        r, nw, y, summed, eps = norm if norm is not None else (x, x, x, x, 0.0)
        count = arrival_counters("router_topk", SPLIT_MAX_ROW_BLOCKS, x.device) if splits > 1 else part
        _router_gemm_topk_kernel[(row_blocks, splits)](
            x, weight, part, count, w, ids, r, nw, y, summed, eps,
            T, E, D, x.stride(0), weight.stride(0), scale, splits, per, K=top_k, KP=triton.next_power_of_2(top_k),
            BLOCK_T=16, BLOCK_E=block_e, BLOCK_D=block_d,
            SIGMOID=scoring == "sigmoid", RENORM=renormalize,
            PRECISION="ieee" if x.dtype == torch.float32 else "tf32", SPLIT=splits > 1, MAX_SPLITS=MAX_SPLITS,
            ADD_NORM=norm is not None, D_PAD=triton.next_power_of_2(D) if norm is not None else 16,
            EARLY_R=early_r and norm is not None, EXTRA=extra_row, xo_ptr=xo,
            num_warps=_SHAPE["warps"], num_stages=3,
            **launch_options(x.device))
    return (w, ids, xo) if extra_row else (w, ids)


def topk_router(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [T, E] -> (weights [T, K] float32, ids [T, K] int64)."""
    T, E = logits.shape
    _check_route(scoring, top_k, E)
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    w = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int64, device=logits.device)
    if T:
        _topk_router_kernel[(T,)](logits, w, ids, E, logits.stride(0), scale, K=top_k,
                                  KP=triton.next_power_of_2(top_k), BLOCK_E=triton.next_power_of_2(E),
                                  SIGMOID=scoring == "sigmoid", RENORM=renormalize, num_warps=1 if E <= 128 else 2,
                                  **launch_options(logits.device))
    return w, ids


def topk_router_ref(logits: torch.Tensor, top_k: int, scoring: str = "softmax", renormalize: bool = False,
                    scale: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    scores = logits.float().sigmoid() if scoring == "sigmoid" else logits.float().softmax(-1)
    w, ids = scores.topk(top_k, dim=-1)
    if renormalize:
        w = w / (w.sum(-1, keepdim=True) + 1e-20)
    return w * scale, ids
