"""Everything between the QKV GEMM and attention in one Triton kernel: optional q/k RMSNorm (over all heads, as
OLMoE, or per head, as Qwen3), rotary embedding of q and k, and the store of k and v into their cache slots.
`qk_rope_store_ref` is the plain-torch twin built from the reference pieces (rms_norm_ref, rotary_ref,
store_kv_ref), so the fused kernel is checked against the path it replaces.

It replaces up to four launches per layer (q norm, k norm, rotary, KV store); at decode each of them is a few
microseconds of latency for a few kilobytes of data. One program per token; q comes back as a new [T, H, hd]
tensor, k and v go only to the cache (the paged attention kernel reads them from there).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moelab.kernels.pdl import early_reads, gdc_prologue, launch_options

NORM_MODES = {None: 0, "full": 1, "per_head": 2}
_WARPS = 4


def set_num_warps(n: int) -> None:
    """Warps of each qk_rope_store program (launch-shape sweeps; CUDA graphs must be recaptured)."""
    global _WARPS
    if n not in (1, 2, 4, 8, 16):
        raise ValueError(f"warps must be a power of two in 1..16, got {n}")
    _WARPS = n


@triton.jit
def _offsets(NH: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Offsets [HP, HALF] of the two rotated halves of each head (heads >= NH masked), the per-head columns and the
    head mask."""
    h = tl.arange(0, HP)
    i = tl.arange(0, HALF)
    if INTERLEAVED:
        i1, i2 = 2 * i, 2 * i + 1
    else:
        i1, i2 = i, i + HALF
    return h[:, None] * (2 * HALF) + i1[None, :], h[:, None] * (2 * HALF) + i2[None, :], i1, i2, (h < NH)[:, None]


@triton.jit
def _norm_weights(w_ptr, NH: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr, NORM: tl.constexpr,
                  INTERLEAVED: tl.constexpr):
    """The norm weight's two halves as _norm_rope multiplies them (no kernel writes them: read before the wait)."""
    off1, off2, i1, i2, hm = _offsets(NH, HP, HALF, INTERLEAVED)
    if NORM == 1:  # one norm over all heads: weight [NH * 2 * HALF]
        return tl.load(w_ptr + off1, mask=hm, other=0.0), tl.load(w_ptr + off2, mask=hm, other=0.0)
    elif NORM == 2:  # a norm per head: weight [2 * HALF]
        return tl.load(w_ptr + i1)[None, :], tl.load(w_ptr + i2)[None, :]
    else:
        return 0.0, 0.0


@triton.jit
def _norm_rope(x_ptr, w1, w2, c, s, eps, NH: tl.constexpr, HP: tl.constexpr, HALF: tl.constexpr,
               NORM: tl.constexpr, INTERLEAVED: tl.constexpr):
    """Rows [HP, HALF] x 2 of one token's heads (heads >= NH masked): normalized as RMSNorm rounds (cast to the
    activation dtype, then times the weight halves w1 / w2 from _norm_weights), then rotated in float32. Returns
    the two rotated halves."""
    off1, off2, i1, i2, hm = _offsets(NH, HP, HALF, INTERLEAVED)
    x1 = tl.load(x_ptr + off1, mask=hm, other=0.0)
    x2 = tl.load(x_ptr + off2, mask=hm, other=0.0)
    if NORM > 0:
        dt = x1.dtype
        f1 = x1.to(tl.float32)
        f2 = x2.to(tl.float32)
        if NORM == 1:  # one norm over all heads: weight [NH * 2 * HALF]
            ss = tl.sum(tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1), axis=0)
            inv = 1.0 / tl.sqrt(ss / (NH * 2 * HALF) + eps)
            x1 = ((f1 * inv).to(dt) * w1).to(dt)
            x2 = ((f2 * inv).to(dt) * w2).to(dt)
        else:  # a norm per head: weight [2 * HALF]
            ss = tl.sum(f1 * f1, axis=1) + tl.sum(f2 * f2, axis=1)
            inv = (1.0 / tl.sqrt(ss / (2 * HALF) + eps))[:, None]
            x1 = ((f1 * inv).to(dt) * w1).to(dt)
            x2 = ((f2 * inv).to(dt) * w2).to(dt)
    f1 = x1.to(tl.float32)
    f2 = x2.to(tl.float32)
    return off1, off2, hm, f1 * c[None, :] - f2 * s[None, :], f2 * c[None, :] + f1 * s[None, :]


@triton.jit
def _qk_rope_store_kernel(qkv_ptr, qo_ptr, kc_ptr, vc_ptr, pos_ptr, slot_ptr, cos_ptr, sin_ptr, qw_ptr, kw_ptr,
                          stride_t, stride_qo, stride_kc, stride_vc, eps,
                          H: tl.constexpr, KV: tl.constexpr, HP: tl.constexpr, KVP: tl.constexpr,
                          HALF: tl.constexpr, NORM: tl.constexpr, INTERLEAVED: tl.constexpr,
                          EARLY_W: tl.constexpr = True, USE_PDL: tl.constexpr = False):
    # positions, slots (the step's inputs, copied in before any kernel of the step), the RoPE tables (built once)
    # and the norm weights are read before waiting for the projection in front: no kernel of the step writes them
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + t)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    i = tl.arange(0, HALF)
    c = tl.load(cos_ptr + pos * HALF + i)
    s = tl.load(sin_ptr + pos * HALF + i)
    if EARLY_W:
        qw1, qw2 = _norm_weights(qw_ptr, H, HP, HALF, NORM, INTERLEAVED)
        kw1, kw2 = _norm_weights(kw_ptr, KV, KVP, HALF, NORM, INTERLEAVED)
    gdc_prologue(USE_PDL)
    if not EARLY_W:  # (pdl.set_early_reads(False): the A/B of reading them early)
        qw1, qw2 = _norm_weights(qw_ptr, H, HP, HALF, NORM, INTERLEAVED)
        kw1, kw2 = _norm_weights(kw_ptr, KV, KVP, HALF, NORM, INTERLEAVED)
    row = qkv_ptr + t * stride_t
    o1, o2, hm, y1, y2 = _norm_rope(row, qw1, qw2, c, s, eps, H, HP, HALF, NORM, INTERLEAVED)
    q_out = qo_ptr + t * stride_qo
    tl.store(q_out + o1, y1.to(qo_ptr.dtype.element_ty), mask=hm)
    tl.store(q_out + o2, y2.to(qo_ptr.dtype.element_ty), mask=hm)
    k_row = row + H * 2 * HALF
    o1, o2, hm, y1, y2 = _norm_rope(k_row, kw1, kw2, c, s, eps, KV, KVP, HALF, NORM, INTERLEAVED)
    k_out = kc_ptr + slot * stride_kc
    tl.store(k_out + o1, y1.to(kc_ptr.dtype.element_ty), mask=hm)
    tl.store(k_out + o2, y2.to(kc_ptr.dtype.element_ty), mask=hm)
    d = tl.arange(0, KVP * 2 * HALF)
    dm = d < KV * 2 * HALF
    v = tl.load(k_row + KV * 2 * HALF + d, mask=dm)
    tl.store(vc_ptr + slot * stride_vc + d, v, mask=dm)


def _norm_mode(norm: str | None) -> int:
    if norm not in NORM_MODES:
        raise ValueError(f"qk norm {norm!r}; allowed: {', '.join(map(str, NORM_MODES))}")
    return NORM_MODES[norm]


def qk_rope_store(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                  cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  slot_mapping: torch.Tensor, norm: str | None = None, q_weight: torch.Tensor | None = None,
                  k_weight: torch.Tensor | None = None, eps: float = 1e-6, interleaved: bool = False
                  ) -> torch.Tensor:
    """qkv [T, (H + 2 KV) * hd] (the fused projection's output, unit last stride); cos/sin [P, hd/2] float32
    tables; k_cache/v_cache [S, KV * hd] (every cache slot as one row); slot_mapping [T] int. norm: None, "full"
    (q_weight [H*hd], k_weight [KV*hd]) or "per_head" (weights [hd]). Returns q [T, H, hd] normalized and
    rotated; rotated k and v are written to rows slot_mapping[t] of the caches."""
    mode = _norm_mode(norm)
    T, width = qkv.shape
    H, KV = num_heads, num_kv_heads
    hd = width // (H + 2 * KV)
    half = hd // 2
    if hd * (H + 2 * KV) != width or hd % 2 or half & (half - 1):
        raise ValueError(f"qkv width {width} is not (H={H} + 2 KV={KV}) x head_dim with head_dim twice a power of 2")
    if qkv.stride(-1) != 1:
        raise ValueError(f"qkv must have a unit last stride, got strides {qkv.stride()}")
    if tuple(cos.shape[1:]) != (half,) or cos.shape != sin.shape:
        raise ValueError(f"cos/sin must be [positions, {half}], got {tuple(cos.shape)} and {tuple(sin.shape)}")
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.dim() != 2 or c.shape[1] != KV * hd or c.stride(-1) != 1 or c.dtype != qkv.dtype:
            raise ValueError(f"{name} must be [slots, {KV * hd}] {qkv.dtype} with a unit last stride, got "
                             f"{tuple(c.shape)} {c.dtype}")
    if mode:
        want = (H * hd, KV * hd) if mode == 1 else (hd, hd)
        got = tuple(w.shape[0] if w is not None else None for w in (q_weight, k_weight))
        if got != want:
            raise ValueError(f"{norm} q/k norm wants weights of sizes {want}, got {got}")
    q = torch.empty(T, H, hd, dtype=qkv.dtype, device=qkv.device)
    if T:
        qw = q_weight if mode else cos
        kw = k_weight if mode else cos
        _qk_rope_store_kernel[(T,)](qkv, q, k_cache, v_cache, positions, slot_mapping, cos, sin, qw, kw,
                                    qkv.stride(0), q.stride(0), k_cache.stride(0), v_cache.stride(0), eps,
                                    H=H, KV=KV, HP=triton.next_power_of_2(H), KVP=triton.next_power_of_2(KV),
                                    HALF=half, NORM=mode, INTERLEAVED=interleaved, EARLY_W=early_reads(),
                                    num_warps=_WARPS,
                                    **launch_options(qkv.device))
    return q


def qk_rope_store_ref(qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      slot_mapping: torch.Tensor, norm: str | None = None, q_weight: torch.Tensor | None = None,
                      k_weight: torch.Tensor | None = None, eps: float = 1e-6, interleaved: bool = False
                      ) -> torch.Tensor:
    """The unfused path: rms_norm_ref, rotary_ref, store_kv_ref one after the other."""
    from moelab.kernels.rms_norm import rms_norm_ref
    from moelab.kernels.rotary import rotary_ref
    from moelab.kernels.store_kv import store_kv_ref

    _norm_mode(norm)
    T, width = qkv.shape
    H, KV = num_heads, num_kv_heads
    hd = width // (H + 2 * KV)
    q, k, v = qkv.split([H * hd, KV * hd, KV * hd], dim=-1)
    if norm == "full":
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q, k = q.reshape(T, H, hd), k.reshape(T, KV, hd)
    if norm == "per_head":
        q, k = rms_norm_ref(q, q_weight, eps), rms_norm_ref(k, k_weight, eps)
    q, k = rotary_ref(q, k, positions.long(), cos, sin, interleaved)
    store_kv_ref(k.reshape(T, -1), v.reshape(T, -1), k_cache, v_cache, slot_mapping)
    return q
