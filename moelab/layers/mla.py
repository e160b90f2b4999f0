"""Multi-head latent attention (DeepSeek-V2/V3) over the compressed latent cache.

The cache keeps, per token and layer, the normalized KV latent (kv_lora_rank) and the roped shared key
(qk_rope_head_dim): [num_blocks, block_size, kv_lora_rank + rope]. Two computations of the same attention:

- "sdpa" (reference): expand the latent through kv_b_proj into per-head keys and values for every read;
- "triton" (absorbed): fold kv_b_proj's key half into the query, q_lat[h] = q_nope[h] @ W_UK[h] (so the
  score is q_lat . latent + q_pe . k_pe), attend over the cache itself as one shared KV head with
  Dk = kv_lora_rank + rope and Dv = kv_lora_rank (the value is the latent), then apply the value half:
  out[h] = o_lat[h] @ W_UV[h]^T. It reads the compressed cache once per step instead of expanding it.
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.context import get_forward_context
from moelab.kernels import mla_decode
from moelab.layers.attention import causal_sdpa, gather_slots
from moelab.layers.linear import Linear
from moelab.layers.norm import RMSNorm
from moelab.layers.rotary import RotaryEmbedding, yarn_softmax_scale_factor
from moelab.spec import ModelSpec


class MLAttention(nn.Module):
    def __init__(self, spec: ModelSpec) -> None:
        super().__init__()
        D, H = spec.hidden_size, spec.num_heads
        self.num_heads, self.kv_lora_rank = H, spec.kv_lora_rank
        self.nope, self.rope, self.v_dim = spec.qk_nope_head_dim, spec.qk_rope_head_dim, spec.v_head_dim
        qk = self.nope + self.rope
        bias = spec.attention_bias
        self.q_lora_rank = spec.q_lora_rank
        if spec.q_lora_rank:
            self.q_a_proj = Linear(D, spec.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(spec.q_lora_rank, spec.rms_norm_eps)
            self.q_b_proj = Linear(spec.q_lora_rank, H * qk, bias=False)
        else:
            self.q_proj = Linear(D, H * qk, bias=False)
        self.kv_a_proj_with_mqa = Linear(D, spec.kv_lora_rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(spec.kv_lora_rank, spec.rms_norm_eps)
        self.kv_b_proj = Linear(spec.kv_lora_rank, H * (self.nope + self.v_dim), bias=False)
        self.o_proj = Linear(H * self.v_dim, D, bias=bias)
        self.rotary = RotaryEmbedding(self.rope, spec.rope_theta, spec.rope_scaling, interleaved=True)
        self.scale = qk ** -0.5 * yarn_softmax_scale_factor(spec.rope_scaling)
        self.kv_cache: torch.Tensor | None = None  # [num_blocks, block_size, kv_lora_rank + rope]
        self.impl = "sdpa"
        self.w_uk: torch.Tensor | None = None  # [H, nope, r]: kv_b_proj's key half, contiguous (absorbed path)
        self.w_uv_t: torch.Tensor | None = None  # [H, r, v]: its value half, transposed

    @torch.no_grad()
    def split_kv_b(self) -> None:
        """Contiguous copies of kv_b_proj's two halves for the absorbed path (batched GEMMs over heads would
        otherwise read strided views); 2 * H * (nope + v) * r extra elements per layer."""
        w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.v_dim, self.kv_lora_rank)
        self.w_uk = w[:, :self.nope].contiguous()
        self.w_uv_t = w[:, self.nope:].transpose(1, 2).contiguous()

    def cache_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (num_blocks, block_size, self.kv_lora_rank + self.rope)

    def _expand(self, latent: torch.Tensor, k_pe: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent [n, r], k_pe [n, rope] -> k [n, H, nope+rope], v [n, H, v_dim]."""
        n = latent.shape[0]
        kv = self.kv_b_proj(latent).view(n, self.num_heads, self.nope + self.v_dim)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat((k_nope, k_pe[:, None, :].expand(n, self.num_heads, self.rope)), dim=-1)
        return k, v

    def _absorbed(self, q_nope: torch.Tensor, q_pe: torch.Tensor, ctx) -> torch.Tensor:
        """q_nope [T, H, nope], q_pe [T, H, rope] -> [T, H, v_dim], attending over the latent cache."""
        if self.w_uk is None:
            self.split_kv_b()
        q_lat = torch.bmm(q_nope.transpose(0, 1), self.w_uk).transpose(0, 1)  # [T, H, r]
        return self._attend_latent(torch.cat((q_lat, q_pe), dim=-1), ctx)

    def _attend_latent(self, q_full: torch.Tensor, ctx) -> torch.Tensor:
        """q_full [T, H, r + rope] (the absorbed query) -> [T, H, v_dim]."""
        from moelab.kernels.paged_attention import paged_attention

        r = self.kv_lora_rank
        N, bs, _ = self.kv_cache.shape
        k_cache = self.kv_cache.view(N, bs, 1, r + self.rope)
        v_cache = self.kv_cache[..., :r].unsqueeze(2)
        o_lat = paged_attention(q_full, k_cache, v_cache, ctx.cu_seqlens_q, ctx.seq_lens_t, ctx.block_tables,
                                self.scale, ctx.max_query_len, max_seq_len=ctx.max_seq_len)  # [T, H, r]
        if o_lat.shape[0] == 1 and mla_decode.enabled("uv") and mla_decode.supports(self.nope, r, self.rope,
                                                                                     self.v_dim):  # a PDL GEMV
            return mla_decode.mla_uv(o_lat, self.w_uv_t)
        return torch.bmm(o_lat.transpose(0, 1), self.w_uv_t).transpose(0, 1)  # [T, H, v]

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        T, H = x.shape[0], self.num_heads
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))) if self.q_lora_rank else self.q_proj(x)
        kv = self.kv_a_proj_with_mqa(x)
        ctx = get_forward_context()
        cached = self.kv_cache is not None and ctx.has_cache
        if (cached and self.impl == "triton" and T == 1 and self.rotary.cos is not None and mla_decode.enabled("prep")
                and mla_decode.supports(self.nope, self.kv_lora_rank, self.rope)):
            # one token: bmm, cat, rms_norm, rotary and store_kv as one launch (moelab/kernels/mla_decode.py)
            if self.w_uk is None:
                self.split_kv_b()
            norm = self.kv_a_layernorm
            q_full = mla_decode.mla_prep(q, kv, positions, self.rotary.cos, self.rotary.sin, self.w_uk, norm.weight,
                                       norm.eps, self.kv_cache.view(-1, self.kv_lora_rank + self.rope),
                                       ctx.slot_mapping, interleaved=self.rotary.interleaved)
            return self.o_proj(self._attend_latent(q_full, ctx).reshape(T, H * self.v_dim))
        q_nope, q_pe = q.view(T, H, self.nope + self.rope).split([self.nope, self.rope], dim=-1)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)
        q_pe, k_pe = self.rotary(positions, q_pe, k_pe[:, None, :])
        k_pe = k_pe[:, 0]
        if cached and self.impl == "triton":
            from moelab.kernels.store_kv import store_kv

            # latent and rope key into the two column ranges of each slot's row: one launch, no concatenation
            rows = self.kv_cache.view(-1, self.kv_lora_rank + self.rope)
            store_kv(latent, k_pe, rows[:, :self.kv_lora_rank], rows[:, self.kv_lora_rank:], ctx.slot_mapping)
            return self.o_proj(self._absorbed(q_nope, q_pe, ctx).reshape(T, H * self.v_dim))
        if cached:
            self.kv_cache.view(-1, self.kv_lora_rank + self.rope)[ctx.slot_mapping] = torch.cat((latent, k_pe), -1)
        q = torch.cat((q_nope, q_pe), dim=-1)
        out = q.new_empty(T, H, self.v_dim)
        cu = ctx.cu_seqlens_q.tolist()
        for b, n in enumerate(ctx.seq_lens):
            s, e = cu[b], cu[b + 1]
            if cached:
                lat_b, pe_b = self.kv_cache.view(-1, self.kv_lora_rank + self.rope)[gather_slots(ctx, b, n)].split(
                    [self.kv_lora_rank, self.rope], dim=-1)
            else:
                lat_b, pe_b = latent[s:e], k_pe[s:e]
            k, v = self._expand(lat_b, pe_b)
            out[s:e] = causal_sdpa(q[s:e], k, v, self.scale)
        return self.o_proj(out.reshape(T, H * self.v_dim))
