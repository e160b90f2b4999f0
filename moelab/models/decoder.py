"""The decoder-only skeleton every family shares: embed -> L x (attention, FFN) -> norm -> LM head.

A family file supplies its attention and FFN modules per layer; the module tree mirrors the HF names
(`model.layers.{i}.self_attn`, `.mlp` or `.block_sparse_moe`, `lm_head`) so checkpoints map one to one.
Each layer exposes its attention half and its FFN half separately (module-based batching needs that).
"""

from __future__ import annotations

import torch
from torch import nn

from moelab.layers.linear import Linear
from moelab.layers.norm import RMSNorm
from moelab.spec import ModelSpec


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, attn: nn.Module, ffn: nn.Module, ffn_name: str = "mlp") -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.self_attn = attn
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)
        self.ffn_name = ffn_name
        self.add_module(ffn_name, ffn)

    @property
    def ffn(self) -> nn.Module:
        return getattr(self, self.ffn_name)

    def forward_attention(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        return h + self.self_attn(positions, self.input_layernorm(h))

    def forward_ffn(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.ffn(self.post_attention_layernorm(h))

    def forward(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        norm = self.post_attention_layernorm
        if norm.impl == "triton":  # the residual add and the FFN's norm in one kernel
            from moelab.kernels.rms_norm import add_rms_norm

            x, h = add_rms_norm(h, self.self_attn(positions, self.input_layernorm(h)), norm.weight, norm.eps)
            return h + self.ffn(x)
        return self.forward_ffn(self.forward_attention(positions, h))


class DecoderModel(nn.Module):
    def __init__(self, spec: ModelSpec, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(spec.vocab_size, spec.hidden_size)
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps)


class MoECausalLM(nn.Module):
    """forward(input_ids [T], positions [T]) -> hidden [T, D]; compute_logits(hidden [N, D]) -> [N, V]."""

    # HF names of one expert's (gate, up, down) projections in checkpoints
    expert_proj_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj")

    def __init__(self, spec: ModelSpec, layers: list[DecoderLayer]) -> None:
        super().__init__()
        self.spec = spec
        self.model = DecoderModel(spec, layers)
        self.lm_head = Linear(spec.hidden_size, spec.vocab_size, bias=False)
        if spec.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        h = self.model.embed_tokens(input_ids)
        if self.model.norm.impl == "triton":
            return self._forward_fused_residual(positions, h)
        for layer in self.model.layers:
            h = layer(positions, h)
        return self.model.norm(h)

    def _forward_fused_residual(self, positions: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """The same sums as forward(), but every residual add runs inside the next norm's kernel (add_rms_norm):
        the FFN output of layer i is added in layer i+1's input norm, the last one in the final norm; an MoE block
        whose backend defers its top-k sum hands back TopKRows, summed in that norm too (forward hooks on the block
        see TopKRows here). The layers' attention and FFN modules are called as usual, DecoderLayer.forward itself is
        not (hooks on it do not fire)."""
        from moelab.kernels.rms_norm import add_rms_norm
        from moelab.layers.moe.layer import SparseMoE, TopKRows

        # every residual below was written by the add_norm (or add_norm_route) before an attention or FFN module,
        # which launches at least two kernels: the norms may read it before their PDL wait (residual_settled)
        def add_norm(out: torch.Tensor | TopKRows, residual: torch.Tensor, norm: nn.Module):
            if isinstance(out, TopKRows):  # the MoE's top-k sum inside the norm (no moe_sum launch)
                return add_rms_norm(out.rows, residual, norm.weight, norm.eps, top_k=out.top_k, extra=out.extra,
                                    extra_gate=out.gate, residual_settled=True)
            return add_rms_norm(out, residual, norm.weight, norm.eps, residual_settled=True)

        residual, out = h, None
        for layer in self.model.layers:
            norm = layer.input_layernorm
            x, residual = (norm(h), h) if out is None else add_norm(out, residual, norm)
            attn, post, ffn = layer.self_attn(positions, x), layer.post_attention_layernorm, layer.ffn
            if isinstance(ffn, SparseMoE) and ffn.fold_norm_into_router(attn):  # one row: norm + router, one kernel
                x, residual, *routing = ffn.add_norm_route(attn, residual, post, residual_settled=True)
                out = ffn(x, sum_topk=False, routing=tuple(routing))  # (weights, ids[, a block's own extra])
                continue
            x, residual = add_norm(attn, residual, post)
            # SparseMoE and its subclasses that take sum_topk
            out = ffn(x, sum_topk=False) if isinstance(ffn, SparseMoE) and ffn.takes_sum_topk else ffn(x)
        if out is None:
            return self.model.norm(h)
        return add_norm(out, residual, self.model.norm)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def attention_modules(self) -> list[nn.Module]:
        """The modules that own a KV cache (they define cache_shape, a kv_cache attribute and impl)."""
        return [m for m in self.modules() if hasattr(m, "cache_shape")]

    @torch.no_grad()
    def prepare_fast_path(self, max_positions: int) -> None:
        """Kernels for everything small: one-kernel RMSNorm and rotary (tables up to max_positions), fused QKV
        projections, gate and up of dense/shared MLPs as one GEMM, float32 router weights kept instead of cast per
        call (routing schemes the top-k kernel does not cover), the router GEMM inside the top-k kernel, contiguous
        MLA absorption weights, q/k norm + RoPE + KV store as one kernel, residual adds inside the next norm, the
        MLP tails as one kernel each. Same math as the reference path."""
        from moelab.layers.attention import GQAttention
        from moelab.layers.mla import MLAttention
        from moelab.layers.mlp import GatedMLP
        from moelab.layers.moe.layer import Router, SparseMoE
        from moelab.layers.norm import RMSNorm
        from moelab.layers.rotary import RotaryEmbedding

        for m in self.modules():
            if isinstance(m, RMSNorm):
                m.impl = "triton"
            elif isinstance(m, RotaryEmbedding):
                m.build_tables(max_positions)
            elif isinstance(m, GQAttention):
                m.fuse_qkv()
            elif isinstance(m, Router) and m.weight.dtype != torch.float32:
                m.weight_f32 = m.weight.float()
            elif isinstance(m, SparseMoE):
                m.use_fused_routing()
            elif isinstance(m, MLAttention):
                m.split_kv_b()
            elif isinstance(m, GatedMLP):
                m.fuse_gate_up()

    def set_attention_impl(self, impl: str) -> None:
        """"sdpa" (reference, any device) or "triton" (paged kernel; needs a KV cache)."""
        from moelab.layers.attention import check_impl

        check_impl(impl)
        for m in self.attention_modules():
            m.impl = impl
