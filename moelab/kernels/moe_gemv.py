"""The experts of one token as matrix-vector products (decode at batch 1), beside the tensor-core GEMMs of
fused_moe.py; `moe_gemv_ref` beside it.

At one token each of the top-k experts is a GEMV: the layer reads k experts' weights once and does almost no
arithmetic. fused_moe.py computes them with `tl.dot` over 16-row blocks of which one row is live. Here:

gate_up: program (column block j, slot s) reads the BLOCK_N gate rows and the BLOCK_N up rows of expert
    e = topk_ids[s] that make h[s, j*BLOCK_N:(j+1)*BLOCK_N] = silu(G x) * (U x), in BLOCK_K chunks (float32 sums).
down: program (row block j, slot s) computes y[s, rows] = w[s] * (W2[e][rows] h[s]). The expert ids were written
    by the router two launches earlier, so each program reads its expert id and issues the load of its first weight
    chunk *before* its PDL wait (moelab.kernels.pdl): when a kernel starts, the one before it has passed its own
    wait, so everything two launches back is complete. Only h, written by gate_up, is read after the wait.

Outputs are those of fused_moe's gate_up/down at naive blocks: h [K, I] and the router-weighted slot rows [K, D]
(summed by moe_sum or by the next add_rms_norm). Sums run in another order than the tensor cores', so results
agree to float32 rounding of the sums, not bit for bit.

Quantized experts (fused_moe's formats, W = Q * S): 8-bit weights are converted to float32 in registers and S is
applied to the float32 sums (per expert or per output row at the end; a 128x128 block's scale to the partial sum of
that block's columns). The activations stay in their dtype. For int8_channel (W8A16) that is the format's own
arithmetic. For the fp8 formats (W8A8 on the tensor cores: x and h rounded to fp8 per token) it is not: at one
token the GEMVs compute with the weights alone quantized, which reads the same weight bytes, skips the two
activation quantizations and lands closer to the unquantized result. A batch-1 step of an fp8 model therefore
differs from the same request in a larger batch by up to the activation rounding (about 1e-2 relative).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

_ENABLED = True


def set_enabled(on: bool) -> None:
    """Off: one-token MoE layers run fused_moe's tensor-core GEMMs (for A/B timings; CUDA graphs must be
    recaptured)."""
    global _ENABLED
    _ENABLED = bool(on)


def enabled() -> bool:
    return _ENABLED


@dataclass(frozen=True)
class MoeGemvConfig:
    block_n: int  # output columns (gate_up: h columns, i.e. twice as many weight rows) per program
    block_k: int
    num_warps: int


def default_configs(D: int, I: int, weight_bytes: int = 2) -> tuple[MoeGemvConfig, MoeGemvConfig]:
    """(gate_up, down). From a sweep of 30 pairs on an H200 over the one-token bf16 layers of OLMoE, Qwen1.5-MoE,
    DeepSeek-V2-Lite, Qwen3-30B-A3B and Mixtral (docs/perf/engine.md, v9): gate_up 2 h columns (4 weight rows) a
    program in chunks of up to 1,024 values on 4 warps; down 8 rows in chunks of up to 512 on 4 warps. Best of 30
    pairs on OLMoE and Mixtral, within 2.5 % of the best on Qwen1.5-MoE and DeepSeek-V2-Lite, 9 % on Qwen3.
    1-byte weights take chunks twice as long (the same bytes a load)."""
    f = 2 if weight_bytes == 1 else 1
    return (MoeGemvConfig(2, min(1024 * f, triton.next_power_of_2(max(D, 16))), 4),
            MoeGemvConfig(8, min(512 * f, triton.next_power_of_2(max(I, 16))), 4))


SCALE_BLOCK = 128  # fp8_block: 128 x 128 weight blocks (moelab/layers/moe/quant.py)
_SB = tl.constexpr(SCALE_BLOCK)  # the same inside the kernels
# fused_moe.QUANT_FORMATS' names -> (scale code: 1 per expert, 2 per output row, 3 per 128x128 block; weight dtype)
FORMATS = {"fp8_tensor": (1, torch.float8_e4m3fn), "fp8_channel": (2, torch.float8_e4m3fn),
           "fp8_block": (3, torch.float8_e4m3fn), "int8_channel": (2, torch.int8)}


_TWO60 = tl.constexpr(2.0 ** 60)  # fp8 words: e4m3 bits placed in float32 read 2^-120 of their value (see _products)


@triton.jit
def _products(w, x_ptr, c, cm, PER: tl.constexpr, FP8: tl.constexpr):
    """The chunk's float32 products with x: [rows, units] (a unit is PER weight values; columns c, live cm).

    PER 1: w holds the weights, x_ptr points to x (any float dtype).
    PER 4 (8-bit weights, bf16 x): w holds int32 words of 4 weight bytes, x_ptr to int64 words of 4 bf16 values;
    both are unpacked with integer operations only (conversion instructions run at a quarter of the FMA rate and
    capped the element path at 55-64 % of the read rate on an H200). bf16 -> float32 is a 16-bit shift. An e4m3 byte
    (s eeee mmm) is moved to s 0000eeee mmm0... of a float32, which reads 2^-120 times the byte's value, subnormals
    included; x is taken times 2^60 and the products times 2^60 again, so that no product is subnormal. An
    int8 byte b gives the float32 bits 0x4B000000 | (b ^ 0x80) = 2^23 + b + 128, exact, less 2^23 + 128."""
    if PER == 1:
        x = tl.load(x_ptr + c, mask=cm, other=0.0).to(tl.float32)
        return w.to(tl.float32) * x[None, :]
    else:
        q = tl.load(x_ptr.to(tl.pointer_type(tl.int64)) + c, mask=cm, other=0)
        lo = q.to(tl.int32)
        hi = (q >> 32).to(tl.int32)
        x0 = (lo << 16).to(tl.float32, bitcast=True)[None, :]
        x1 = (lo & -65536).to(tl.float32, bitcast=True)[None, :]
        x2 = (hi << 16).to(tl.float32, bitcast=True)[None, :]
        x3 = (hi & -65536).to(tl.float32, bitcast=True)[None, :]
        if FP8:
            x0 *= _TWO60
            x1 *= _TWO60
            x2 *= _TWO60
            x3 *= _TWO60
            f0 = (((w & 0x7F) << 20) | ((w & 0x80) << 24)).to(tl.float32, bitcast=True)
            f1 = (((w & 0x7F00) << 12) | ((w & 0x8000) << 16)).to(tl.float32, bitcast=True)
            f2 = (((w & 0x7F0000) << 4) | ((w & 0x800000) << 8)).to(tl.float32, bitcast=True)
            f3 = (((w >> 4) & 0x07F00000) | (w & -2147483648)).to(tl.float32, bitcast=True)
            return (f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3) * _TWO60
        else:
            f0 = (((w & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            f1 = ((((w >> 8) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            f2 = ((((w >> 16) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            f3 = ((((w >> 24) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
            return f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3


@triton.jit
def _chunk_sum(prod, s_rows, smask, k0, KB, stride_sk, W_SCALE: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr, PER: tl.constexpr):
    """Sum the chunk's products [BLOCK_N, BLOCK_K // PER] over its columns -> [BLOCK_N] float32. Block scales
    (W_SCALE 3): each 128-column block's partial sum times its scale (s_rows: pointers to the rows' scale rows,
    smask: live rows, KB: the number of column blocks)."""
    if W_SCALE == 3:
        if BLOCK_K > _SB:
            NB: tl.constexpr = BLOCK_K // _SB
            part = tl.sum(tl.reshape(prod, (BLOCK_N, NB, _SB // PER)), axis=2)
            kb = k0 // _SB + tl.arange(0, NB)
            s = tl.load(s_rows[:, None] + kb[None, :] * stride_sk, mask=smask[:, None] & (kb[None, :] < KB),
                        other=0.0)
            return tl.sum(part * s, axis=1)
        else:  # the chunk lies in one column block (BLOCK_K a power of two <= 128)
            return tl.sum(prod, axis=1) * tl.load(s_rows + (k0 // _SB) * stride_sk, mask=smask, other=0.0)
    else:
        return tl.sum(prod, axis=1)


@triton.jit
def _moe_gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, s_ptr, I, D, stride_we, stride_wn, stride_h, stride_se,
                             stride_sn, stride_sk, up_block_row, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                             W_SCALE: tl.constexpr = 0, PER: tl.constexpr = 1, FP8: tl.constexpr = False,
                             USE_PDL: tl.constexpr = False):
    """PER 4: w's strides count int32 words (4 bytes), D stays in values."""
    gdc_prologue(USE_PDL)  # the expert ids come from the kernel just before (the router)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1)
    e = tl.load(ids_ptr + slot).to(tl.int64)
    cmask = cols < I
    offs = tl.arange(0, BLOCK_K // PER)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) if PER == 4 else w_ptr
    g_rows = wp + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    u_rows = g_rows + I * stride_wn
    s_base = s_ptr + e * stride_se
    sg_rows = s_base + (cols // _SB) * stride_sn  # block scales: the gate's block rows, then the up's
    su_rows = s_base + (up_block_row + cols // _SB) * stride_sn
    KB = tl.cdiv(D, _SB)
    acc_g = tl.zeros([BLOCK_N], dtype=tl.float32)
    acc_u = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        c = k0 // PER + offs
        cm = c < D // PER
        m = cmask[:, None] & cm[None, :]
        pg = _products(tl.load(g_rows + c[None, :], mask=m, other=0.0), x_ptr, c, cm, PER, FP8)
        acc_g += _chunk_sum(pg, sg_rows, cmask, k0, KB, stride_sk, W_SCALE, BLOCK_N, BLOCK_K, PER)
        pu = _products(tl.load(u_rows + c[None, :], mask=m, other=0.0), x_ptr, c, cm, PER, FP8)
        acc_u += _chunk_sum(pu, su_rows, cmask, k0, KB, stride_sk, W_SCALE, BLOCK_N, BLOCK_K, PER)
    if W_SCALE == 1:
        s = tl.load(s_base)
        acc_g *= s
        acc_u *= s
    if W_SCALE == 2:
        acc_g *= tl.load(s_base + cols * stride_sn, mask=cmask, other=0.0)
        acc_u *= tl.load(s_base + (I + cols) * stride_sn, mask=cmask, other=0.0)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + slot * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, w_ptr, ids_ptr, wt_ptr, y_ptr, s_ptr, D, I, stride_h, stride_we, stride_wn, stride_y,
                          stride_se, stride_sn, stride_sk, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                          W_SCALE: tl.constexpr = 0, PER: tl.constexpr = 1, FP8: tl.constexpr = False,
                          USE_PDL: tl.constexpr = False):
    """PER 4: w's strides count int32 words (4 bytes), I stays in values."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1)
    rmask = rows < D
    offs = tl.arange(0, BLOCK_K // PER)
    nu = I // PER
    # before the wait: the expert id and router weight (two launches back) and the first weight chunk
    e = tl.load(ids_ptr + slot).to(tl.int64)
    wt = tl.load(wt_ptr + slot).to(tl.float32)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) if PER == 4 else w_ptr
    w_rows = wp + e * stride_we + rows.to(tl.int64)[:, None] * stride_wn
    w = tl.load(w_rows + offs[None, :], mask=rmask[:, None] & (offs[None, :] < nu), other=0.0)
    s_base = s_ptr + e * stride_se
    s_rows = s_base + (rows // _SB) * stride_sn
    KB = tl.cdiv(I, _SB)
    h_row = h_ptr + slot * stride_h
    gdc_prologue(USE_PDL)
    acc = _chunk_sum(_products(w, h_row, offs, offs < nu, PER, FP8), s_rows, rmask, 0, KB, stride_sk, W_SCALE,
                     BLOCK_N, BLOCK_K, PER)
    for k0 in range(BLOCK_K, I, BLOCK_K):
        c = k0 // PER + offs
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & (c[None, :] < nu), other=0.0)
        acc += _chunk_sum(_products(w, h_row, c, c < nu, PER, FP8), s_rows, rmask, k0, KB, stride_sk, W_SCALE,
                          BLOCK_N, BLOCK_K, PER)
    if W_SCALE == 1:
        acc *= tl.load(s_base)
    if W_SCALE == 2:
        acc *= tl.load(s_base + rows * stride_sn, mask=rmask, other=0.0)
    tl.store(y_ptr + slot * stride_y + rows, (acc * wt).to(y_ptr.dtype.element_ty), mask=rmask)


def applies(x: torch.Tensor, w13: torch.Tensor, quant: str | None) -> bool:
    """One token on a GPU, switched on; weights of x's dtype, or of a quantized format's dtype."""
    want = x.dtype if quant is None else FORMATS[quant][1] if quant in FORMATS else None
    return (_ENABLED and x.is_cuda and x.shape[0] == 1 and w13.dtype == want and x.stride(-1) == 1
            and w13.stride(-1) == 1)


def _packable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """8-bit weights and bf16 x whose rows start on 4-byte (weights) and 8-byte (x, h) boundaries."""
    D, I = x.shape[1], w2.shape[2]
    return (w13.element_size() == 1 and w2.element_size() == 1 and x.dtype == torch.bfloat16 and D % 4 == 0
            and I % 4 == 0 and all(s % 4 == 0 for s in (*w13.stride()[:2], *w2.stride()[:2]))
            and w13.data_ptr() % 4 == 0 and w2.data_ptr() % 4 == 0 and x.data_ptr() % 8 == 0)


def _scale_args(quant: str | None, w: torch.Tensor, scale: torch.Tensor | None, want: tuple) -> list:
    """[scale tensor, its 3 strides] for a launch (w stands in when unquantized)."""
    if quant is None:
        return [w, 0, 0, 0]
    if scale is None or tuple(scale.shape) != want or scale.dtype != torch.float32:
        got = None if scale is None else f"{tuple(scale.shape)} {scale.dtype}"
        raise ValueError(f"moe_gemv: {quant} wants float32 scales of shape {want}, got {got}")
    return [scale, *scale.stride(), *[0] * (3 - scale.dim())]


def moe_gemv(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, configs: tuple[MoeGemvConfig, MoeGemvConfig] | None = None, quant: str | None = None,
             w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, packed: bool | None = None
             ) -> torch.Tensor:
    """x [1, D], topk_ids [1, K], topk_weights [1, K], w13 [E, 2I, D], w2 [E, D, I] -> the router-weighted slot
    rows [K, D] in x's dtype (fused_moe(..., sum_topk=False) at one token). quant: a FORMATS key; then w13 / w2
    hold Q (fp8 / int8) and w13_scale / w2_scale S in fused_moe's shapes (W = Q * S). packed: 8-bit weights read
    as 4-byte words and unpacked with integer operations (see _products); None takes it wherever it applies."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"moe_gemv takes one token x [1, D], got {tuple(x.shape)}")
    if quant is not None and quant not in FORMATS:
        raise ValueError(f"moe_gemv: unknown quant format {quant!r}; available: {', '.join(FORMATS)}")
    D, (E, I2, Dw), K = x.shape[1], w13.shape, topk_ids.shape[1]
    I = I2 // 2
    if Dw != D or w2.shape != (E, D, I) or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}")
    x = x.contiguous()
    want_dtype = x.dtype if quant is None else FORMATS[quant][1]
    if w13.dtype != want_dtype or w2.dtype != want_dtype:
        raise ValueError(f"moe_gemv: {quant or 'unquantized'} weights must be {want_dtype}, got {w13.dtype}, "
                         f"{w2.dtype}")
    code = 0 if quant is None else FORMATS[quant][0]
    nb = lambda n: triton.cdiv(n, SCALE_BLOCK)  # noqa: E731
    want13, want2 = {0: ((), ()), 1: ((E,), (E,)), 2: ((E, I2), (E, D)),
                     3: ((E, 2 * nb(I), nb(D)), (E, nb(D), nb(I)))}[code]
    s13 = _scale_args(quant, w13, w13_scale, want13)
    s2 = _scale_args(quant, w2, w2_scale, want2)
    gu, dn = configs or default_configs(D, I, w13.element_size())
    per = 4 if (packed if packed is not None else _packable(x, w13, w2)) else 1
    if per == 4 and not _packable(x, w13, w2):
        raise ValueError("moe_gemv: packed=True needs 8-bit weights, bf16 x, D and I multiples of 4 and 4-byte "
                         "aligned rows")
    if per == 4 and min(gu.block_k, dn.block_k) < 4:
        raise ValueError(f"moe_gemv: packed chunks need block_k >= 4, got {gu.block_k}, {dn.block_k}")
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    h = torch.empty(K, I, dtype=x.dtype, device=x.device)
    y = torch.empty(K, D, dtype=x.dtype, device=x.device)
    opts = dict(W_SCALE=code, PER=per, FP8=w13.dtype == torch.float8_e4m3fn, **launch_options(x.device))
    _moe_gate_up_gemv_kernel[(triton.cdiv(I, gu.block_n), K)](
        x, w13, ids, h, s13[0], I, D, w13.stride(0) // per, w13.stride(1) // per, h.stride(0), *s13[1:], nb(I),
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, num_warps=gu.num_warps, **opts)
    _moe_down_gemv_kernel[(triton.cdiv(D, dn.block_n), K)](
        h, w2, ids, wts, y, s2[0], D, I, h.stride(0), w2.stride(0) // per, w2.stride(1) // per, y.stride(0),
        *s2[1:], BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps, **opts)
    return y


def moe_gemv_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """Plain torch, float32: the router-weighted slot rows [K, D] of one token."""
    ids = topk_ids.reshape(-1)
    I = w13.shape[1] // 2
    gu = torch.einsum("d,snd->sn", x[0].float(), w13[ids].float())
    h = (F.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype).float()  # h is stored in x's dtype between the two kernels
    return (torch.einsum("si,sdi->sd", h, w2[ids].float()) * topk_weights.reshape(-1, 1).float()).to(x.dtype)
