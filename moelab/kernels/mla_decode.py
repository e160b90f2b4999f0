"""DeepSeek's absorbed attention at one token: what runs between its projections and attention (`mla_prep`) and
between attention and o_proj (`mla_uv`), as Triton kernels that take part in PDL; `*_ref` twins beside them.

DeepSeek's absorbed attention (moelab/layers/mla.py) needs, per token, after q_proj and kv_a_proj_with_mqa:
- the query over the latent cache: q_lat[h] = q_nope[h] @ W_UK[h] (a batched product over heads), then the roped
  q_pe[h] beside it, as one [H, R + rope] row;
- the cache row of the token: the RMS-normalized latent and the roped shared key, stored into its slot.
Done with torch and the other kernels that is five launches a layer (bmm, cat, rms_norm, rotary, store_kv), each a
few microseconds of latency for kilobytes of data at batch 1. Here it is one launch:

program (t, j < H * NC): head h = j // NC, latent columns [c * BLOCK_R, (c + 1) * BLOCK_R), c = j % NC: the
    column block of q_lat (float32 sums over the nope channels, one rounding); the c = 0 program also writes the
    head's roped q_pe. Its W_UK tile is read *before* the PDL wait (weights no kernel writes), q after.
program (t, H * NC): the token's latent, normalized as RMSNorm rounds (float32, cast, times the weight), and its
    roped k_pe, into cache row slot_mapping[t].

Positions, slots and the RoPE tables are the step's inputs (copied in before any kernel of the step, tables built
once) and are read before the wait too, as qk_rope_store does.

mla_uv: out[t, h] = o_lat[t, h] @ W_UV^T[h] ([R] -> [V] per head, the value half of kv_b_proj), which torch runs as a
cuBLAS bmm. cuBLAS takes no part in PDL (its kernel starts only after the one before it has ended, and the one
after it waits for all of it); program (t, head, V block) here reads its [R, BLOCK_V] weight tile before the wait.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import gdc_prologue, launch_options

_ENABLED = {"prep": True, "uv": True}


def set_enabled(on: bool, uv: bool | None = None) -> None:
    """Off: one-token MLA runs bmm, cat, rms_norm, rotary and store_kv instead of mla_prep; uv False: the cuBLAS bmm
    instead of mla_uv (for A/B timings; CUDA graphs must be recaptured)."""
    _ENABLED["prep"] = bool(on)
    if uv is not None:
        _ENABLED["uv"] = bool(uv)


def enabled(which: str = "prep") -> bool:
    return _ENABLED[which]


@triton.jit
def _rope_pairs(x_ptr, c, s, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """One vector of 2 * HALF values rotated in float32: (offsets of the two halves, rotated halves)."""
    i = tl.arange(0, HALF)
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    f1 = tl.load(x_ptr + i1).to(tl.float32)
    f2 = tl.load(x_ptr + i2).to(tl.float32)
    return i1, i2, f1 * c - f2 * s, f2 * c + f1 * s


@triton.jit
def _mla_prep_kernel(q_ptr, kv_ptr, wuk_ptr, nw_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, qo_ptr, cache_ptr,
                     stride_qt, stride_kvt, stride_qot, stride_qoh, stride_cache, eps,
                     H: tl.constexpr, NOPE: tl.constexpr, R: tl.constexpr, HALF: tl.constexpr,
                     BLOCK_R: tl.constexpr, INTERLEAVED: tl.constexpr, USE_PDL: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    j = tl.program_id(1)
    NC: tl.constexpr = R // BLOCK_R
    ROPE: tl.constexpr = 2 * HALF
    pos = tl.load(pos_ptr + t)
    hi = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + hi)
    s = tl.load(sin_ptr + pos * HALF + hi)
    if j < H * NC:
        h = j // NC
        cb = j % NC
        n = tl.arange(0, NOPE)
        r = cb * BLOCK_R + tl.arange(0, BLOCK_R)
        w = tl.load(wuk_ptr + h * NOPE * R + n[:, None] * R + r[None, :])  # [NOPE, BLOCK_R]: before the wait
        gdc_prologue(USE_PDL)
        q_row = q_ptr + t * stride_qt + h * (NOPE + ROPE)
        qn = tl.load(q_row + n).to(tl.float32)
        q_lat = tl.sum(w.to(tl.float32) * qn[:, None], axis=0)
        out = qo_ptr + t * stride_qot + h * stride_qoh
        tl.store(out + r, q_lat.to(qo_ptr.dtype.element_ty))
        if cb == 0:
            i1, i2, y1, y2 = _rope_pairs(q_row + NOPE, c, s, HALF, INTERLEAVED)
            tl.store(out + R + i1, y1.to(qo_ptr.dtype.element_ty))
            tl.store(out + R + i2, y2.to(qo_ptr.dtype.element_ty))
    else:
        slot = tl.load(slot_ptr + t).to(tl.int64)
        k = tl.arange(0, R)
        nw = tl.load(nw_ptr + k)
        gdc_prologue(USE_PDL)
        kv_row = kv_ptr + t * stride_kvt
        lat = tl.load(kv_row + k)
        f = lat.to(tl.float32)
        inv = 1.0 / tl.sqrt(tl.sum(f * f, axis=0) / R + eps)
        normed = ((f * inv).to(lat.dtype) * nw).to(cache_ptr.dtype.element_ty)
        row = cache_ptr + slot * stride_cache
        tl.store(row + k, normed)
        i1, i2, y1, y2 = _rope_pairs(kv_row + R, c, s, HALF, INTERLEAVED)
        tl.store(row + R + i1, y1.to(cache_ptr.dtype.element_ty))
        tl.store(row + R + i2, y2.to(cache_ptr.dtype.element_ty))


def _pow2(v: int) -> bool:
    return v >= 1 and not v & (v - 1)


def supports(nope: int, R: int, rope: int, v_dim: int | None = None) -> bool:
    """The shapes the one-token kernels take: power-of-two nope, R, rope / 2 (rope even) and v_dim (DeepSeek-V2,
    V2-Lite and V3: 128, 512, 64, 128). MLAttention falls back to the torch steps for others."""
    return (_pow2(nope) and _pow2(R) and rope % 2 == 0 and _pow2(rope // 2)
            and (v_dim is None or _pow2(v_dim)))


def _check(q, kv, w_uk, norm_weight, cache_rows, cos, sin) -> tuple[int, int, int, int, int]:
    H, nope, R = w_uk.shape
    T, rope = kv.shape[0], kv.shape[1] - R
    if q.dim() != 2 or q.shape != (T, H * (nope + rope)) or kv.dim() != 2:
        raise ValueError(f"mla_prep: q must be [T, H * (nope + rope)] = [{T}, {H * (nope + rope)}] and kv "
                         f"[T, R + rope]; got q {tuple(q.shape)}, kv {tuple(kv.shape)}, w_uk {tuple(w_uk.shape)}")
    if not supports(nope, R, rope):
        raise ValueError(f"mla_prep: nope, R and rope / 2 must be powers of two (rope even), got nope={nope}, R={R}, "
                         f"rope={rope}")
    half = rope // 2
    if not w_uk.is_contiguous() or q.stride(-1) != 1 or kv.stride(-1) != 1:
        raise ValueError("mla_prep: w_uk contiguous, q and kv with a unit last stride")
    if tuple(norm_weight.shape) != (R,) or tuple(cos.shape[1:]) != (half,) or cos.shape != sin.shape:
        raise ValueError(f"mla_prep: norm weight [{R}], cos/sin [positions, {half}]; got {tuple(norm_weight.shape)}, "
                         f"{tuple(cos.shape)}, {tuple(sin.shape)}")
    if cache_rows.dim() != 2 or cache_rows.shape[1] != R + rope or cache_rows.stride(-1) != 1:
        raise ValueError(f"mla_prep: cache rows must be [slots, {R + rope}] with a unit last stride, got "
                         f"{tuple(cache_rows.shape)}")
    return T, H, nope, R, rope


def mla_prep(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
             w_uk: torch.Tensor, norm_weight: torch.Tensor, eps: float, cache_rows: torch.Tensor,
             slot_mapping: torch.Tensor, interleaved: bool = True, block_r: int = 64) -> torch.Tensor:
    """q [T, H * (nope + rope)] (q_proj's output), kv [T, R + rope] (kv_a_proj_with_mqa's), w_uk [H, nope, R],
    norm_weight [R] (kv_a_layernorm), cos/sin [P, rope / 2] float32, cache_rows [slots, R + rope] (the latent cache,
    one row per slot) -> the absorbed query [T, H, R + rope]; the token's normalized latent and roped key are
    written to cache_rows[slot_mapping[t]]."""
    T, H, nope, R, rope = _check(q, kv, w_uk, norm_weight, cache_rows, cos, sin)
    block_r = min(block_r, R)
    out = torch.empty(T, H, R + rope, dtype=q.dtype, device=q.device)
    if T:
        _mla_prep_kernel[(T, H * (R // block_r) + 1)](
            q, kv, w_uk, norm_weight, positions, slot_mapping, cos, sin, out, cache_rows, q.stride(0), kv.stride(0),
            out.stride(0), out.stride(1), cache_rows.stride(0), eps, H=H, NOPE=nope, R=R, HALF=rope // 2,
            BLOCK_R=block_r, INTERLEAVED=interleaved, num_warps=4, **launch_options(q.device))
    return out


def mla_prep_ref(q: torch.Tensor, kv: torch.Tensor, positions: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 w_uk: torch.Tensor, norm_weight: torch.Tensor, eps: float, cache_rows: torch.Tensor,
                 slot_mapping: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """The five steps it replaces, from their reference pieces (bmm in float32, then rounded once)."""
    from moelab.kernels.rms_norm import rms_norm_ref
    from moelab.kernels.rotary import rotary_ref

    T, H, nope, R, rope = _check(q, kv, w_uk, norm_weight, cache_rows, cos, sin)
    qh = q.view(T, H, nope + rope)
    q_lat = torch.einsum("thn,hnr->thr", qh[..., :nope].float(), w_uk.float()).to(q.dtype)
    latent, k_pe = kv[:, :R], kv[:, R:]
    q_pe, k_pe = rotary_ref(qh[..., nope:], k_pe[:, None, :], positions, cos, sin, interleaved)
    cache_rows[slot_mapping.long()] = torch.cat((rms_norm_ref(latent, norm_weight, eps), k_pe[:, 0]), -1).to(
        cache_rows.dtype)
    return torch.cat((q_lat, q_pe), -1)


@triton.jit
def _mla_uv_kernel(o_ptr, w_ptr, out_ptr, stride_ot, stride_oh, stride_outt, stride_outh,
                   R: tl.constexpr, V: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr = False):
    t = tl.program_id(0).to(tl.int64)
    h = tl.program_id(1)
    v = tl.program_id(2) * BLOCK_V + tl.arange(0, BLOCK_V)
    r = tl.arange(0, R)
    w = tl.load(w_ptr + h * R * V + r[:, None] * V + v[None, :])  # [R, BLOCK_V]: before the wait
    gdc_prologue(USE_PDL)
    o = tl.load(o_ptr + t * stride_ot + h * stride_oh + r).to(tl.float32)
    y = tl.sum(w.to(tl.float32) * o[:, None], axis=0)
    tl.store(out_ptr + t * stride_outt + h * stride_outh + v, y.to(out_ptr.dtype.element_ty))


def mla_uv(o_lat: torch.Tensor, w_uv_t: torch.Tensor, block_v: int = 32) -> torch.Tensor:
    """o_lat [T, H, R] (attention over the latent cache; any strides but the last), w_uv_t [H, R, V] contiguous ->
    [T, H, V] in o_lat's dtype: per head o_lat @ w_uv_t, float32 sums, one rounding."""
    H, R, V = w_uv_t.shape
    if o_lat.dim() != 3 or o_lat.shape[1:] != (H, R) or o_lat.stride(-1) != 1 or not w_uv_t.is_contiguous():
        raise ValueError(f"mla_uv: o_lat [T, {H}, {R}] with a unit last stride and w_uv_t contiguous [H, R, V]; got "
                         f"{tuple(o_lat.shape)}, {tuple(w_uv_t.shape)}")
    if R & (R - 1) or V & (V - 1):
        raise ValueError(f"mla_uv: R and V must be powers of two, got {R}, {V}")
    block_v = min(block_v, V)
    T = o_lat.shape[0]
    out = torch.empty(T, H, V, dtype=o_lat.dtype, device=o_lat.device)
    if T:
        _mla_uv_kernel[(T, H, V // block_v)](o_lat, w_uv_t, out, o_lat.stride(0), o_lat.stride(1), out.stride(0),
                                             out.stride(1), R=R, V=V, BLOCK_V=block_v, num_warps=4,
                                             **launch_options(o_lat.device))
    return out


def mla_uv_ref(o_lat: torch.Tensor, w_uv_t: torch.Tensor) -> torch.Tensor:
    return torch.einsum("thr,hrv->thv", o_lat.float(), w_uv_t.float()).to(o_lat.dtype)
