"""Multi-head / grouped-query attention over a paged KV cache, with the reference (SDPA) path.

`Attention` is the core: store this step's K/V at their slots, then attend per sequence. `GQAttention`
adds the projections of the MHA families (q/k/v/o, optional bias, q/k RMSNorm per head or over all heads,
QKV clipping, RoPE). `impl` picks the attention computation: "sdpa" (the reference: per-sequence SDPA
over keys gathered from the cache, any device) or "triton" (moelab.kernels.paged_attention: one launch for
a whole mixed prefill/decode batch, no host sync, so it can run inside a CUDA graph).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moelab.context import ForwardContext, get_forward_context
from moelab.layers.linear import Linear, linear
from moelab.layers.norm import RMSNorm
from moelab.layers.rotary import RotaryEmbedding
from moelab.spec import ModelSpec

ATTENTION_IMPLS = ("sdpa", "triton")


def check_impl(impl: str) -> str:
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"unknown attention implementation {impl!r}; allowed: {', '.join(ATTENTION_IMPLS)}")
    return impl


def gather_slots(ctx: ForwardContext, b: int, n: int) -> torch.Tensor:
    """Cache slots [n] holding the first n tokens of sequence b."""
    pos = torch.arange(n, device=ctx.block_tables.device)
    return ctx.block_tables[b, pos // ctx.block_size].long() * ctx.block_size + pos % ctx.block_size


def causal_sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """q [Tq, H, d], k [Tk, H, dk], v [Tk, H, dv] -> [Tq, H, dv]; query i sits at position Tk - Tq + i."""
    Tq, Tk = q.shape[0], k.shape[0]
    mask = torch.ones(Tq, Tk, dtype=torch.bool, device=q.device).tril(diagonal=Tk - Tq)
    out = F.scaled_dot_product_attention(q.transpose(0, 1), k.transpose(0, 1), v.transpose(0, 1),
                                         attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def paged_attention_ref(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor | None,
                        ctx: ForwardContext, scale: float) -> torch.Tensor:
    """q [T, H, d], k/v [T, KV, d] (this step's tokens) -> [T, H, d]. With a cache, keys and values of each
    sequence are read back from kv_cache [2, num_blocks, block_size, KV, d] through its block table."""
    out = torch.empty_like(q)
    rep = q.shape[1] // k.shape[1]
    cu = ctx.cu_seqlens_q.tolist()
    for b, n in enumerate(ctx.seq_lens):
        s, e = cu[b], cu[b + 1]
        if kv_cache is not None and ctx.has_cache:
            slots = gather_slots(ctx, b, n)
            kb, vb = kv_cache[0].flatten(0, 1)[slots], kv_cache[1].flatten(0, 1)[slots]
        else:
            kb, vb = k[s:e], v[s:e]
        kb, vb = kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1)
        out[s:e] = causal_sdpa(q[s:e], kb, vb, scale)
    return out


class Attention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, scale: float) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim, self.scale = num_heads, num_kv_heads, head_dim, scale
        self.kv_cache: torch.Tensor | None = None  # bound by the engine
        self.impl = "sdpa"

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (2, num_blocks, block_size, self.num_kv_heads, self.head_dim)

    def fast_path(self, ctx: ForwardContext) -> bool:
        """True when this step runs the Triton kernels over the paged cache."""
        return self.kv_cache is not None and ctx.has_cache and self.impl == "triton"

    def cache_rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The K and V caches viewed [slots, KV * head_dim] (one row per cache slot)."""
        W = self.num_kv_heads * self.head_dim
        return self.kv_cache[0].view(-1, W), self.kv_cache[1].view(-1, W)

    def attend_cached(self, q: torch.Tensor, ctx: ForwardContext) -> torch.Tensor:
        """Attention of q [T, H, d] over the cache, this step's K/V already stored (fast path only)."""
        from moelab.kernels.paged_attention import paged_attention

        return paged_attention(q, self.kv_cache[0], self.kv_cache[1], ctx.cu_seqlens_q, ctx.seq_lens_t,
                               ctx.block_tables, self.scale, ctx.max_query_len, max_seq_len=ctx.max_seq_len)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        ctx = get_forward_context()
        if self.fast_path(ctx):
            from moelab.kernels.store_kv import store_kv

            T, W = k.shape[0], self.num_kv_heads * self.head_dim
            k_rows, v_rows = self.cache_rows()
            store_kv(k.reshape(T, W), v.reshape(T, W), k_rows, v_rows, ctx.slot_mapping)
            return self.attend_cached(q, ctx)
        if self.kv_cache is not None and ctx.has_cache:
            self.kv_cache[0].view(-1, self.num_kv_heads, self.head_dim)[ctx.slot_mapping] = k
            self.kv_cache[1].view(-1, self.num_kv_heads, self.head_dim)[ctx.slot_mapping] = v
        return paged_attention_ref(q, k, v, self.kv_cache, ctx, self.scale)


class GQAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        D, H, KV, hd = spec.hidden_size, spec.num_heads, spec.num_kv_heads, spec.head_dim
        self.num_heads, self.num_kv_heads, self.head_dim = H, KV, hd
        self.q_proj = Linear(D, H * hd, bias=spec.attention_bias)
        self.k_proj = Linear(D, KV * hd, bias=spec.attention_bias)
        self.v_proj = Linear(D, KV * hd, bias=spec.attention_bias)
        self.o_proj = Linear(H * hd, D, bias=False)
        self.qk_norm, self.clip_qkv = spec.qk_norm, spec.clip_qkv
        if spec.qk_norm == "full":  # OLMoE: one norm over all heads
            self.q_norm, self.k_norm = RMSNorm(H * hd, spec.rms_norm_eps), RMSNorm(KV * hd, spec.rms_norm_eps)
        elif spec.qk_norm == "per_head":  # Qwen3: a norm per head
            self.q_norm, self.k_norm = RMSNorm(hd, spec.rms_norm_eps), RMSNorm(hd, spec.rms_norm_eps)
        self.rotary = RotaryEmbedding(hd, spec.rope_theta, spec.rope_scaling)
        self.attn = Attention(H, KV, hd, hd ** -0.5)
        self.qkv_weight: torch.Tensor | None = None
        self.qkv_bias: torch.Tensor | None = None

    @torch.no_grad()
    def fuse_qkv(self) -> None:
        """One GEMM for q, k and v: the three weights move into one buffer and the Linear weights become views
        of it (no extra memory; checkpoint names and state_dict stay as they were)."""
        if self.qkv_weight is not None:
            return
        self.qkv_weight = torch.cat([self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])
        sizes = [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features]
        for lin, w in zip((self.q_proj, self.k_proj, self.v_proj), self.qkv_weight.split(sizes)):
            lin.weight = nn.Parameter(w, requires_grad=False)
        if self.q_proj.bias is not None:
            self.qkv_bias = torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias])
            for lin, b in zip((self.q_proj, self.k_proj, self.v_proj), self.qkv_bias.split(sizes)):
                lin.bias = nn.Parameter(b, requires_grad=False)

    def _fused_ok(self, ctx: ForwardContext, x: torch.Tensor) -> bool:
        """q/k norm, RoPE and the KV store can run as one kernel (moelab.kernels.qk_rope_store): Triton path with
        a cache, RoPE tables built, no QKV clipping, head_dim twice a power of two, the cache in the activations'
        dtype, and one eps for both norms."""
        hd = self.head_dim
        return self.qkv_weight is not None and self.attn.fast_path(ctx) and self.rotary.cos is not None \
            and self.clip_qkv is None and hd % 2 == 0 and (hd // 2) & (hd // 2 - 1) == 0 \
            and self.attn.kv_cache.dtype == x.dtype \
            and (self.qk_norm == "none" or self.q_norm.eps == self.k_norm.eps)

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T = x.shape[0]
        ctx = get_forward_context()
        if self._fused_ok(ctx, x):
            from moelab.kernels.qk_rope_store import qk_rope_store

            qkv = linear(x, self.qkv_weight, self.qkv_bias)
            norm = None if self.qk_norm == "none" else self.qk_norm
            k_rows, v_rows = self.attn.cache_rows()
            q = qk_rope_store(qkv, self.num_heads, self.num_kv_heads, positions, self.rotary.cos, self.rotary.sin,
                              k_rows, v_rows, ctx.slot_mapping, norm,
                              self.q_norm.weight if norm else None, self.k_norm.weight if norm else None,
                              self.q_norm.eps if norm else 1e-6, self.rotary.interleaved)
            return self.o_proj(self.attn.attend_cached(q, ctx).reshape(T, -1))
        if self.qkv_weight is not None:
            q, k, v = linear(x, self.qkv_weight, self.qkv_bias).split(
                [self.q_proj.out_features, self.k_proj.out_features, self.v_proj.out_features], dim=-1)
        else:
            q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.clip_qkv is not None:
            q, k, v = (t.clamp(-self.clip_qkv, self.clip_qkv) for t in (q, k, v))
        q, k, v = q.view(T, -1, self.head_dim), k.view(T, -1, self.head_dim), v.view(T, -1, self.head_dim)
        if self.qk_norm == "per_head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary(positions, q, k)
        return self.o_proj(self.attn(q, k, v).reshape(T, -1))
