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

int8_channel experts (W8A16, W = Q * S with S per output row): the format's own arithmetic, as on the tensor cores
(x unquantized, exact int8 values, float32 sums, S applied to each row's sum). With bf16 x (and D, I multiples of
4) the weights are read as int32 words of 4 values and unpacked with integer operations (`_products`). The fp8
formats (W8A8) stay on the tensor cores: GEMVs of their weights were measured no faster (docs/perf/engine.md, v9).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from moelab import device
from moelab.kernels.pdl import gdc_prologue, launch_options

_ENABLED = True


_DENSE = True
_EARLY_ROUTING = True  # gate_up reads settled expert ids and its first weight chunk before the PDL wait (A/B switch)


def set_early_routing(on: bool) -> None:
    """Off: gate_up reads the expert ids after its PDL wait even when the caller says they are settled (A/B timings;
    CUDA graphs must be recaptured)."""
    global _EARLY_ROUTING
    _EARLY_ROUTING = bool(on)


def set_enabled(on: bool, dense: bool | None = None) -> None:
    """Off: one-token MoE layers run fused_moe's tensor-core GEMMs. dense False: one-row dense gated MLPs (shared
    experts, dense layers) run their gate_up GEMV and a silu_mul launch instead of gate_up_gemv (both for A/B
    timings; CUDA graphs must be recaptured)."""
    global _ENABLED, _DENSE
    _ENABLED = bool(on)
    if dense is not None:
        _DENSE = bool(dense)


def enabled() -> bool:
    return _ENABLED


def dense_applies(x: torch.Tensor, w: torch.Tensor) -> bool:
    """gate_up_gemv takes this: one row on a GPU, w [2I, D] on its device in x's dtype with a unit last stride, no
    autograd recording, switched on, and the one-row GEMVs not switched off (moelab.kernels.gemv)."""
    from moelab.kernels import gemv

    if not (_DENSE and gemv.enabled() and device.is_gpu(x) and x.dim() == 2 and x.shape[0] == 1 and w.device == x.device
            and w.dtype == x.dtype and x.stride(-1) == 1 and w.dim() == 2 and w.stride(-1) == 1):
        return False
    return not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))


@dataclass(frozen=True)
class MoeGemvConfig:
    block_n: int  # output columns (gate_up: h columns, i.e. twice as many weight rows) per program
    block_k: int
    num_warps: int


def default_configs(D: int, I: int, weight_bytes: int = 2) -> tuple[MoeGemvConfig, MoeGemvConfig]:
    """(gate_up, down), from sweeps on an H200 over the one-token layers of OLMoE, Qwen1.5-MoE, DeepSeek-V2-Lite,
    Qwen3-30B-A3B and Mixtral (docs/perf/engine.md, v9). bf16: gate_up 2 h columns (4 weight rows) a program in
    chunks of up to 1,024 values on 4 warps, down 8 rows in chunks of up to 512 on 4 warps (best of 30 pairs on
    OLMoE and Mixtral, within 2.5 % on Qwen1.5-MoE and DeepSeek-V2-Lite, 9 % on Qwen3). int8 (packed words): gate_up 4
    columns x 2,048, down 16 rows x 512, 4 warps each (best of 20 pairs on OLMoE and Qwen3, within 2.5 % of the best
    on DeepSeek-V2-Lite and Mixtral, 6 % on Qwen1.5-MoE)."""
    if weight_bytes == 1:
        return (MoeGemvConfig(4, min(2048, triton.next_power_of_2(max(D, 16))), 4),
                MoeGemvConfig(16, min(512, triton.next_power_of_2(max(I, 16))), 4))
    return (MoeGemvConfig(2, min(1024, triton.next_power_of_2(max(D, 16))), 4),
            MoeGemvConfig(8, min(512, triton.next_power_of_2(max(I, 16))), 4))


QUANT = "int8_channel"  # the one quantized format taken here (fused_moe.QUANT_FORMATS' name)


@triton.jit
def _products(w, x_ptr, c, cm, PER: tl.constexpr):
    """The chunk's float32 products with x: [rows, units] (a unit is PER weight values; columns c, live cm).

    PER 1: w holds the weights (any float dtype or int8), x_ptr points to x (any float dtype).
    PER 4 (int8 weights, bf16 x): w holds int32 words of 4 weight bytes and x_ptr is read as int64 words of 4 bf16
    values. bf16 -> float32 is a 16-bit shift; an int8 byte b gives the float32 bits 0x4B000000 | (b ^ 0x80),
    which read 2^23 + b + 128 exactly, less 2^23 + 128."""
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
        f0 = (((w & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        f1 = ((((w >> 8) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        f2 = ((((w >> 16) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        f3 = ((((w >> 24) & 0xFF) ^ 0x80) | 0x4B000000).to(tl.float32, bitcast=True) - 8388736.0
        return f0 * x0 + f1 * x1 + f2 * x2 + f3 * x3


@triton.jit
def _moe_gate_up_gemv_kernel(x_ptr, w_ptr, ids_ptr, h_ptr, s_ptr, I, D, stride_we, stride_wn, stride_h, stride_se,
                             BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr = False,
                             PER: tl.constexpr = 1, DENSE: tl.constexpr = False, EARLY_IDS: tl.constexpr = False,
                             USE_PDL: tl.constexpr = False):
    """PER 4: w's strides count int32 words (4 values), D stays in values. SCALED: s [E, 2I] per weight row.
    DENSE: one dense gated MLP (w [2I, D], no ids): the first weight chunk is loaded before the PDL wait, as in the
    down kernel. With experts the ids usually come from the kernel just before (the router), so the wait comes
    first; EARLY_IDS: the caller says they were written at least two launches earlier (a shared expert ran in
    between), so the id and the first weight chunk are read before the wait as well; x always after it."""
    if not (DENSE or EARLY_IDS):
        gdc_prologue(USE_PDL)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    slot = tl.program_id(1)
    if DENSE:
        e = tl.zeros([], dtype=tl.int64)
    else:
        e = tl.load(ids_ptr + slot).to(tl.int64)
    cmask = cols < I
    offs = tl.arange(0, BLOCK_K // PER)
    wp = w_ptr.to(tl.pointer_type(tl.int32)) if PER == 4 else w_ptr
    g_rows = wp + e * stride_we + cols.to(tl.int64)[:, None] * stride_wn
    u_rows = g_rows + I * stride_wn
    cm = offs < D // PER
    m = cmask[:, None] & cm[None, :]
    g = tl.load(g_rows + offs[None, :], mask=m, other=0.0)
    u = tl.load(u_rows + offs[None, :], mask=m, other=0.0)
    if DENSE or EARLY_IDS:
        gdc_prologue(USE_PDL)
    acc_g = tl.sum(_products(g, x_ptr, offs, cm, PER), axis=1)
    acc_u = tl.sum(_products(u, x_ptr, offs, cm, PER), axis=1)
    for k0 in range(BLOCK_K, D, BLOCK_K):
        c = k0 // PER + offs
        cm = c < D // PER
        m = cmask[:, None] & cm[None, :]
        acc_g += tl.sum(_products(tl.load(g_rows + c[None, :], mask=m, other=0.0), x_ptr, c, cm, PER), axis=1)
        acc_u += tl.sum(_products(tl.load(u_rows + c[None, :], mask=m, other=0.0), x_ptr, c, cm, PER), axis=1)
    if SCALED:
        acc_g *= tl.load(s_ptr + e * stride_se + cols, mask=cmask, other=0.0)
        acc_u *= tl.load(s_ptr + e * stride_se + I + cols, mask=cmask, other=0.0)
    h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u
    tl.store(h_ptr + slot * stride_h + cols, h.to(h_ptr.dtype.element_ty), mask=cmask)


@triton.jit
def _moe_down_gemv_kernel(h_ptr, w_ptr, ids_ptr, wt_ptr, y_ptr, s_ptr, D, I, stride_h, stride_we, stride_wn, stride_y,
                          stride_se, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SCALED: tl.constexpr = False,
                          PER: tl.constexpr = 1, USE_PDL: tl.constexpr = False):
    """PER 4: w's strides count int32 words (4 values), I stays in values. SCALED: s [E, D] per weight row."""
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
    h_row = h_ptr + slot * stride_h
    gdc_prologue(USE_PDL)
    acc = tl.sum(_products(w, h_row, offs, offs < nu, PER), axis=1)
    for k0 in range(BLOCK_K, I, BLOCK_K):
        c = k0 // PER + offs
        w = tl.load(w_rows + c[None, :], mask=rmask[:, None] & (c[None, :] < nu), other=0.0)
        acc += tl.sum(_products(w, h_row, c, c < nu, PER), axis=1)
    if SCALED:
        acc *= tl.load(s_ptr + e * stride_se + rows, mask=rmask, other=0.0)
    tl.store(y_ptr + slot * stride_y + rows, (acc * wt).to(y_ptr.dtype.element_ty), mask=rmask)


def applies(x: torch.Tensor, w13: torch.Tensor, quant: str | None, w2: torch.Tensor | None = None,
            scales: tuple[torch.Tensor | None, ...] = ()) -> bool:
    """One token on a GPU, switched on; weights of x's dtype, or int8_channel weights; every weight and scale with
    a unit last stride (the kernels index them so)."""
    want = x.dtype if quant is None else torch.int8 if quant == QUANT else None
    unit = all(t is None or t.stride(-1) == 1 for t in (w13, w2, *scales))
    return _ENABLED and device.is_gpu(x) and x.shape[0] == 1 and w13.dtype == want and x.stride(-1) == 1 and unit


def _packable(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor) -> bool:
    """int8 weights and bf16 x whose rows start on 4-byte (weights) and 8-byte (x, h) boundaries."""
    D, I = x.shape[1], w2.shape[2]
    return (w13.dtype == w2.dtype == torch.int8 and x.dtype == torch.bfloat16 and D % 4 == 0 and I % 4 == 0
            and all(s % 4 == 0 for s in (*w13.stride()[:2], *w2.stride()[:2]))
            and w13.data_ptr() % 4 == 0 and w2.data_ptr() % 4 == 0 and x.data_ptr() % 8 == 0)


def moe_gemv(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
             w2: torch.Tensor, configs: tuple[MoeGemvConfig, MoeGemvConfig] | None = None, quant: str | None = None,
             w13_scale: torch.Tensor | None = None, w2_scale: torch.Tensor | None = None, packed: bool | None = None,
             routing_settled: bool = False) -> torch.Tensor:
    """x [1, D], topk_ids [1, K], topk_weights [1, K], w13 [E, 2I, D], w2 [E, D, I] -> the router-weighted slot
    rows [K, D] in x's dtype (fused_moe(..., sum_topk=False) at one token). quant "int8_channel": w13 / w2 hold
    int8 Q and w13_scale [E, 2I] / w2_scale [E, D] float32 S (W = Q * S). packed: int8 weights read as 4-byte
    words (see _products); None takes it wherever it applies. routing_settled: the caller promises topk_ids was
    written at least two kernel launches before this call (gate_up then reads it before its PDL wait)."""
    if x.dim() != 2 or x.shape[0] != 1:
        raise ValueError(f"moe_gemv takes one token x [1, D], got {tuple(x.shape)}")
    if quant not in (None, QUANT):
        raise ValueError(f"moe_gemv: quant must be None or {QUANT!r}, got {quant!r} (the fp8 formats run on "
                         "fused_moe's tensor cores)")
    D, (E, I2, Dw), K = x.shape[1], w13.shape, topk_ids.shape[1]
    I = I2 // 2
    if Dw != D or w2.shape != (E, D, I) or topk_weights.shape != topk_ids.shape:
        raise ValueError(f"shapes: x {tuple(x.shape)}, w13 {tuple(w13.shape)}, w2 {tuple(w2.shape)}, topk_ids "
                         f"{tuple(topk_ids.shape)}, topk_weights {tuple(topk_weights.shape)}")
    x = x.contiguous()
    if w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError(f"moe_gemv needs weights with a unit last stride, got w13 strides {w13.stride()}, w2 "
                         f"strides {w2.stride()}")
    want_dtype = x.dtype if quant is None else torch.int8
    if w13.dtype != want_dtype or w2.dtype != want_dtype:
        raise ValueError(f"moe_gemv: {quant or 'unquantized'} weights must be {want_dtype}, got {w13.dtype}, "
                         f"{w2.dtype}")
    if quant is not None:
        for name, s, want in (("w13_scale", w13_scale, (E, I2)), ("w2_scale", w2_scale, (E, D))):
            if s is None or tuple(s.shape) != want or s.dtype != torch.float32 or s.stride(-1) != 1:
                got = None if s is None else f"{tuple(s.shape)} {s.dtype}"
                raise ValueError(f"moe_gemv: {quant} wants a float32 {name} of shape {want} with unit last "
                                 f"stride, got {got}")
    gu, dn = configs or default_configs(D, I, w13.element_size())
    per = 4 if (packed if packed is not None else _packable(x, w13, w2)) else 1
    if per == 4 and not _packable(x, w13, w2):
        raise ValueError("moe_gemv: packed=True needs int8 weights, bf16 x, D and I multiples of 4 and 4-byte "
                         "aligned rows")
    if per == 4 and min(gu.block_k, dn.block_k) < 4:
        raise ValueError(f"moe_gemv: packed chunks need block_k >= 4, got {gu.block_k}, {dn.block_k}")
    ids = topk_ids.reshape(-1).contiguous()
    wts = topk_weights.reshape(-1).contiguous()
    h = torch.empty(K, I, dtype=x.dtype, device=x.device)
    y = torch.empty(K, D, dtype=x.dtype, device=x.device)
    s13, s2 = (w13_scale, w2_scale) if quant is not None else (w13, w2)
    opts = dict(SCALED=quant is not None, PER=per, **launch_options(x.device))
    _moe_gate_up_gemv_kernel[(triton.cdiv(I, gu.block_n), K)](
        x, w13, ids, h, s13, I, D, w13.stride(0) // per, w13.stride(1) // per, h.stride(0), s13.stride(0),
        BLOCK_N=gu.block_n, BLOCK_K=gu.block_k, EARLY_IDS=routing_settled and _EARLY_ROUTING,
        num_warps=gu.num_warps, **opts)
    _moe_down_gemv_kernel[(triton.cdiv(D, dn.block_n), K)](
        h, w2, ids, wts, y, s2, D, I, h.stride(0), w2.stride(0) // per, w2.stride(1) // per, y.stride(0),
        s2.stride(0), BLOCK_N=dn.block_n, BLOCK_K=dn.block_k, num_warps=dn.num_warps, **opts)
    return y


def gate_up_gemv(x: torch.Tensor, w: torch.Tensor, config: MoeGemvConfig | None = None) -> torch.Tensor:
    """A dense gated MLP's first half at one row: x [1, D], w [2I, D] (gate rows then up rows) -> silu(x G^T) *
    (x U^T) [1, I] in x's dtype, one launch (the GEMV and silu_mul's two otherwise). gate_up_gemv_ref beside it."""
    if x.dim() != 2 or x.shape[0] != 1 or w.dim() != 2 or w.shape[1] != x.shape[1] or w.shape[0] % 2:
        raise ValueError(f"gate_up_gemv takes x [1, D] and w [2I, D], got {tuple(x.shape)}, {tuple(w.shape)}")
    if w.dtype != x.dtype or w.stride(-1) != 1:
        raise ValueError(f"gate_up_gemv needs w of x's dtype ({x.dtype}) with a unit last stride, got {w.dtype}")
    x = x.contiguous()
    D, I = x.shape[1], w.shape[0] // 2
    cfg = config or default_configs(D, I, w.element_size())[0]
    h = torch.empty(1, I, dtype=x.dtype, device=x.device)
    _moe_gate_up_gemv_kernel[(triton.cdiv(I, cfg.block_n), 1)](
        x, w, w, h, w, I, D, 0, w.stride(0), h.stride(0), 0, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        DENSE=True, num_warps=cfg.num_warps, **launch_options(x.device))
    return h


def gate_up_gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    gu = x.float() @ w.float().T
    g, u = gu.chunk(2, dim=-1)
    return (F.silu(g) * u).to(x.dtype)


def moe_gemv_ref(x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w13: torch.Tensor,
                 w2: torch.Tensor) -> torch.Tensor:
    """Plain torch, float32: the router-weighted slot rows [K, D] of one token."""
    ids = topk_ids.reshape(-1)
    I = w13.shape[1] // 2
    gu = torch.einsum("d,snd->sn", x[0].float(), w13[ids].float())
    h = (F.silu(gu[:, :I]) * gu[:, I:]).to(x.dtype).float()  # h is stored in x's dtype between the two kernels
    return (torch.einsum("si,sdi->sd", h, w2[ids].float()) * topk_weights.reshape(-1, 1).float()).to(x.dtype)
