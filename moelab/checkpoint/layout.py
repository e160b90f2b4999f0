"""The tensors of a Hugging Face checkpoint of each family: names, shapes and how to initialize them.

Names are the families' own (as published on the Hub, per-expert tensors), so other engines and
transformers load what `make-checkpoint` writes.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from moelab.spec import ModelSpec

Init = Literal["normal", "out", "ones", "zeros", "bias"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    init: Init  # normal: N(0, 0.02); out: N(0, 0.02/sqrt(2L)) for residual outputs; bias: N(0, 0.01)

    @property
    def numel(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n


# HF name of (gate, up, down) of one expert
EXPERT_PROJ_NAMES = {"mixtral": ("w1", "w3", "w2")}
DEFAULT_PROJ_NAMES = ("gate_proj", "up_proj", "down_proj")


def moe_prefix(spec: ModelSpec) -> str:
    return "block_sparse_moe" if spec.family == "mixtral" else "mlp"


def _mlp(prefix: str, D: int, width: int, names: tuple[str, str, str] = DEFAULT_PROJ_NAMES) -> list[TensorSpec]:
    g, u, d = names
    return [TensorSpec(f"{prefix}.{g}.weight", (width, D), "normal"),
            TensorSpec(f"{prefix}.{u}.weight", (width, D), "normal"),
            TensorSpec(f"{prefix}.{d}.weight", (D, width), "out")]


def _mha(p: str, s: ModelSpec) -> list[TensorSpec]:
    D, q, kv = s.hidden_size, s.num_heads * s.head_dim, s.num_kv_heads * s.head_dim
    out = [TensorSpec(f"{p}.q_proj.weight", (q, D), "normal"), TensorSpec(f"{p}.k_proj.weight", (kv, D), "normal"),
           TensorSpec(f"{p}.v_proj.weight", (kv, D), "normal"), TensorSpec(f"{p}.o_proj.weight", (D, q), "out")]
    if s.attention_bias:
        out += [TensorSpec(f"{p}.{n}_proj.bias", (w,), "bias") for n, w in (("q", q), ("k", kv), ("v", kv))]
    if s.qk_norm == "full":
        out += [TensorSpec(f"{p}.q_norm.weight", (q,), "ones"), TensorSpec(f"{p}.k_norm.weight", (kv,), "ones")]
    elif s.qk_norm == "per_head":
        out += [TensorSpec(f"{p}.{n}_norm.weight", (s.head_dim,), "ones") for n in ("q", "k")]
    return out


def _mla(p: str, s: ModelSpec) -> list[TensorSpec]:
    D, H, r = s.hidden_size, s.num_heads, s.kv_lora_rank
    if s.q_lora_rank:
        out = [TensorSpec(f"{p}.q_a_proj.weight", (s.q_lora_rank, D), "normal"),
               TensorSpec(f"{p}.q_a_layernorm.weight", (s.q_lora_rank,), "ones"),
               TensorSpec(f"{p}.q_b_proj.weight", (H * s.qk_head_dim, s.q_lora_rank), "normal")]
    else:
        out = [TensorSpec(f"{p}.q_proj.weight", (H * s.qk_head_dim, D), "normal")]
    return out + [
        TensorSpec(f"{p}.kv_a_proj_with_mqa.weight", (r + s.qk_rope_head_dim, D), "normal"),
        TensorSpec(f"{p}.kv_a_layernorm.weight", (r,), "ones"),
        TensorSpec(f"{p}.kv_b_proj.weight", (H * (s.qk_nope_head_dim + s.v_head_dim), r), "normal"),
        TensorSpec(f"{p}.o_proj.weight", (D, H * s.v_head_dim), "out"),
    ]


def _moe(p: str, s: ModelSpec) -> list[TensorSpec]:
    D, E, I = s.hidden_size, s.num_experts, s.moe_intermediate_size
    names = EXPERT_PROJ_NAMES.get(s.family, DEFAULT_PROJ_NAMES)
    out = [TensorSpec(f"{p}.gate.weight", (E, D), "normal")]
    if s.topk_method == "noaux_tc":
        out.append(TensorSpec(f"{p}.gate.e_score_correction_bias", (E,), "bias"))
    for e in range(E):
        out += _mlp(f"{p}.experts.{e}", D, I, names)
    if s.shared_intermediate_size:
        shared = "shared_expert" if s.shared_expert_gate else "shared_experts"
        out += _mlp(f"{p}.{shared}", D, s.shared_intermediate_size)
        if s.shared_expert_gate:
            out.append(TensorSpec(f"{p}.shared_expert_gate.weight", (1, D), "normal"))
    return out


def checkpoint_tensors(spec: ModelSpec) -> Iterator[TensorSpec]:
    D, V = spec.hidden_size, spec.vocab_size
    yield TensorSpec("model.embed_tokens.weight", (V, D), "normal")
    for i in range(spec.num_layers):
        p = f"model.layers.{i}"
        yield TensorSpec(f"{p}.input_layernorm.weight", (D,), "ones")
        yield from (_mla if spec.attention == "mla" else _mha)(f"{p}.self_attn", spec)
        yield TensorSpec(f"{p}.post_attention_layernorm.weight", (D,), "ones")
        if spec.is_moe_layer(i):
            yield from _moe(f"{p}.{moe_prefix(spec)}", spec)
        else:
            yield from _mlp(f"{p}.mlp", D, spec.intermediate_size)
    yield TensorSpec("model.norm.weight", (D,), "ones")
    if not spec.tie_word_embeddings:
        yield TensorSpec("lm_head.weight", (V, D), "normal")
