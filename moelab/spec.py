"""ModelSpec: the family-agnostic numbers of a MoE model, normalized from a Hugging Face config.

No torch here: memory models, rooflines and kernel benchmarks need these numbers without weights.
Dimension letters (docs/architecture.md): D hidden, I expert intermediate, E experts, K top-k,
H query heads, KV key/value heads, V vocabulary, L layers.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Family = Literal["mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"]
TopkMethod = Literal["greedy", "group_limited_greedy", "noaux_tc"]
QKNorm = Literal["none", "per_head", "full"]


@dataclass(frozen=True)
class ModelSpec:
    family: Family
    vocab_size: int  # V
    hidden_size: int  # D
    num_layers: int  # L
    num_heads: int  # H
    num_kv_heads: int  # KV (MHA/GQA); equals H for MLA
    head_dim: int  # per-head dim of q/k/v (MHA/GQA)
    # --- feed-forward ---
    num_experts: int  # E routed experts
    top_k: int  # K
    moe_intermediate_size: int  # I, per routed expert
    intermediate_size: int  # dense-MLP width for dense layers (0 when there are none)
    shared_intermediate_size: int = 0  # total width of the shared expert MLP (0 = none)
    shared_expert_gate: bool = False  # Qwen2-MoE: sigmoid gate on the shared expert
    dense_layers: tuple[int, ...] = ()  # layers with a dense MLP instead of MoE
    # --- routing ---
    scoring_func: Literal["softmax", "sigmoid"] = "softmax"
    topk_method: TopkMethod = "greedy"
    norm_topk_prob: bool = False
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    # --- attention ---
    attention: Literal["mha", "mla"] = "mha"
    qk_norm: QKNorm = "none"
    attention_bias: bool = False  # bias on q/k/v projections
    clip_qkv: float | None = None
    q_lora_rank: int | None = None  # MLA
    kv_lora_rank: int = 0  # MLA latent width
    qk_rope_head_dim: int = 0
    qk_nope_head_dim: int = 0
    v_head_dim: int = 0
    # --- positions, norms, embeddings ---
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = field(default=None, compare=True, hash=False)
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self) -> None:
        def need(ok: bool, msg: str) -> None:
            if not ok:
                raise ValueError(f"invalid ModelSpec ({self.family}): {msg}")

        need(self.num_layers > 0 and self.hidden_size > 0, "layers and hidden_size must be positive")
        need(self.num_experts >= 1, f"num_experts must be >= 1, got {self.num_experts}")
        need(1 <= self.top_k <= self.num_experts, f"top_k must be in [1, {self.num_experts}], got {self.top_k}")
        need(self.num_heads % self.num_kv_heads == 0,
             f"num_heads {self.num_heads} not a multiple of kv heads {self.num_kv_heads}")
        need(all(0 <= i < self.num_layers for i in self.dense_layers),
             f"dense_layers {self.dense_layers} outside [0, {self.num_layers})")
        need(not self.dense_layers or self.intermediate_size > 0, "dense layers need intermediate_size > 0")
        need(self.num_experts % self.n_group == 0,
             f"num_experts {self.num_experts} not divisible by n_group {self.n_group}")
        need(1 <= self.topk_group <= self.n_group,
             f"topk_group {self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.topk_method != "greedy":
            per_group = self.num_experts // self.n_group
            need(self.topk_group * per_group >= self.top_k, "topk_group * experts per group must be >= top_k")
        if self.topk_method == "noaux_tc":
            need(self.num_experts // self.n_group >= 2, "noaux_tc ranks groups by their two best experts: "
                 f"needs >= 2 experts per group, got {self.num_experts} experts in {self.n_group} groups")
        if self.attention == "mla":
            need(self.kv_lora_rank > 0 and self.qk_rope_head_dim > 0 and self.v_head_dim > 0,
                 "MLA needs kv_lora_rank, qk_rope_head_dim, v_head_dim")

    # ----- structure -----
    def is_moe_layer(self, layer: int) -> bool:
        return layer not in self.dense_layers

    @property
    def num_moe_layers(self) -> int:
        return self.num_layers - len(self.dense_layers)

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def replace(self, **changes: Any) -> ModelSpec:
        return dataclasses.replace(self, **changes)

    # ----- parameter counts -----
    def attention_params(self) -> int:
        D, H = self.hidden_size, self.num_heads
        if self.attention == "mla":
            qk, v, r = self.qk_head_dim, self.v_head_dim, self.kv_lora_rank
            if self.q_lora_rank:
                q = D * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk
            else:
                q = D * H * qk
            kv = D * (r + self.qk_rope_head_dim) + r + r * H * (self.qk_nope_head_dim + v)
            return q + kv + H * v * D
        hd, KV = self.head_dim, self.num_kv_heads
        n = D * H * hd + 2 * D * KV * hd + H * hd * D
        if self.attention_bias:
            n += H * hd + 2 * KV * hd
        if self.qk_norm == "per_head":
            n += 2 * hd
        elif self.qk_norm == "full":
            n += H * hd + KV * hd
        return n

    def expert_params(self) -> int:
        """Parameters of one routed expert (gate, up and down projections)."""
        return 3 * self.hidden_size * self.moe_intermediate_size

    def moe_layer_params(self) -> dict[str, int]:
        D, E = self.hidden_size, self.num_experts
        out = {
            "routed_experts": E * self.expert_params(),
            "router": E * D + (E if self.topk_method == "noaux_tc" else 0),
            "shared_experts": 3 * D * self.shared_intermediate_size,
        }
        if self.shared_expert_gate:
            out["shared_experts"] += D
        return out

    def param_counts(self) -> ParamCounts:
        D, V = self.hidden_size, self.vocab_size
        moe = self.moe_layer_params()
        L_moe, L_dense = self.num_moe_layers, len(self.dense_layers)
        routed = L_moe * moe["routed_experts"]
        parts = {
            "embedding": V * D,
            "lm_head": 0 if self.tie_word_embeddings else V * D,
            "attention": self.num_layers * self.attention_params(),
            "norms": self.num_layers * 2 * D + D,
            "router": L_moe * moe["router"],
            "shared_experts": L_moe * moe["shared_experts"],
            "dense_mlp": L_dense * 3 * D * self.intermediate_size,
            "routed_experts": routed,
        }
        total = sum(parts.values())
        active = total - routed + L_moe * self.top_k * self.expert_params()
        return ParamCounts(total=total, active=active, expert=routed, non_expert=total - routed,
                           embedding=V * D, breakdown=parts)

    # ----- KV cache and FLOPs -----
    def kv_elems_per_token_per_layer(self) -> int:
        """Cache entries one token keeps in one layer: 2*KV*head_dim (MHA/GQA) or the MLA latent + rope key."""
        if self.attention == "mla":
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.num_kv_heads * self.head_dim

    def kv_bytes_per_token(self, dtype_bytes: int = 2) -> int:
        return self.num_layers * self.kv_elems_per_token_per_layer() * dtype_bytes

    def flops_per_token(self, context_len: int = 0) -> int:
        """Forward FLOPs for one token: 2 x active matmul params (embedding lookup excluded, LM head included)
        plus attention scores and values over `context_len` earlier tokens (QK^T and PV, non-absorbed MLA)."""
        pc = self.param_counts()
        matmul_params = pc.active - pc.embedding - pc.breakdown["norms"]
        if self.tie_word_embeddings:
            matmul_params += pc.embedding
        v_dim = self.v_head_dim if self.attention == "mla" else self.head_dim
        attn = 2 * self.num_layers * self.num_heads * (self.qk_head_dim + v_dim) * context_len
        return 2 * matmul_params + attn


@dataclass(frozen=True)
class ParamCounts:
    total: int
    active: int  # per token, embedding and LM head included (the convention of Mixtral, OLMoE, Qwen)
    expert: int  # routed-expert parameters
    non_expert: int
    embedding: int
    breakdown: dict[str, int] = field(hash=False)

    @property
    def active_without_embedding(self) -> int:
        """Active parameters excluding the input embedding (a lookup): DeepSeek's convention."""
        return self.active - self.embedding
