"""Memory model: bytes per GPU of a ModelSpec under a Layout (weights by precision, KV cache, activations, CUDA-graph
pool, communication buffers), the largest batch x context that fits, and a fit check that says why not.

Rules (docs/analysis.md repeats them with the numbers):
- Weights. Linear layers (attention, dense MLP, shared and routed experts) take the weight dtype: bf16 2 bytes;
  fp8 1 byte + fp32 scales per 128x128 block (DeepSeek-V3's format, +4/16384 byte per weight); int8 1 byte +
  one fp32 scale per output channel (+4/in_features). Embedding, LM head, router and norms stay bf16.
  Under attention TP t: embedding and LM head are vocab-parallel (/t); q, o, dense and shared MLPs split /t;
  GQA k/v projections hold ceil(KV/t) heads (a KV head is replicated once t > KV); MLA's down projections
  (q_a, kv_a) are replicated, its up projections and o split /t; norms and the router are replicated.
  Routed experts: ceil((E + redundant) / moe_ep) experts per GPU per MoE layer, each split /moe_tp.
- KV cache per token on a GPU: MHA/GQA L * 2 * ceil(KV/t) * head_dim * kv_bytes; MLA L * (kv_lora_rank + rope)
  * kv_bytes on every GPU of the replica (the latent has no head axis, so TP does not split it). Sequences
  take whole blocks of `block_size` tokens.
- Activations: one step of max_num_batched_tokens tokens per replica, each keeping (act bytes) x
  [3D + q/k/v widths on this GPU + K_r (D + 3 I / moe_tp)] with K_r = min(K, local experts) expert pairs,
  plus fp32 logits for max_num_seqs rows of V / t. Sized for the mean load (no skew headroom).
- CUDA graphs: one pool shared by the decode graphs (captured largest first), sized as the activations of
  the largest captured batch, min(cuda_graph_max_bs, max_num_seqs) tokens.
- Communication buffers: 256 MiB for NCCL when G > 1, plus 1 GiB of all-to-all buffers for DPA+EP.
- Budget: gpu_memory x memory_utilization; the KV cache gets what the rest leaves.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from moelab.analysis.hardware import Cluster
from moelab.analysis.layout import Layout
from moelab.spec import ModelSpec

WEIGHT_DTYPES = ("bf16", "fp8", "int8")
KV_DTYPES = {"bf16": 2, "fp16": 2, "fp8": 1}
FP8_BLOCK = 128
COMM_BUFFER = 256 * 2 ** 20
ALL_TO_ALL_BUFFER = 2 ** 30


def bytes_per_weight(dtype: str, in_features: int) -> float:
    """Bytes one weight of a linear layer with `in_features` inputs takes, scales included."""
    if dtype == "bf16":
        return 2.0
    if dtype == "fp8":
        return 1.0 + 4.0 / (FP8_BLOCK * FP8_BLOCK)
    if dtype == "int8":
        return 1.0 + 4.0 / in_features
    raise ValueError(f"weight dtype {dtype!r}; allowed: {', '.join(WEIGHT_DTYPES)}")


def kv_dtype_bytes(kv_dtype: str) -> int:
    if kv_dtype not in KV_DTYPES:
        raise ValueError(f"kv dtype {kv_dtype!r}; allowed: {', '.join(KV_DTYPES)}")
    return KV_DTYPES[kv_dtype]


def kv_heads_per_gpu(spec: ModelSpec, attn_tp: int) -> int:
    """ceil(KV / t): each GPU keeps its share of KV heads, and one whole head once t > KV (replicated)."""
    return -(-spec.num_kv_heads // attn_tp)


def kv_bytes_per_token(spec: ModelSpec, attn_tp: int, kv_dtype: str = "bf16") -> float:
    """KV-cache bytes one token of a sequence takes on each GPU of its attention replica."""
    b = kv_dtype_bytes(kv_dtype)
    if spec.attention == "mla":
        return spec.num_layers * (spec.kv_lora_rank + spec.qk_rope_head_dim) * b
    return spec.num_layers * 2 * kv_heads_per_gpu(spec, attn_tp) * spec.head_dim * b


def attention_params_per_gpu(spec: ModelSpec, t: int) -> tuple[float, float]:
    """(split-or-sharded linear params, replicated params) of one attention layer on one GPU of a TP-t group."""
    D, H = spec.hidden_size, spec.num_heads
    total = spec.attention_params()
    if spec.attention == "mla":
        r, rope = spec.kv_lora_rank, spec.qk_rope_head_dim
        down = D * (r + rope) + r + (D * spec.q_lora_rank + spec.q_lora_rank if spec.q_lora_rank else 0)
        return (total - down) / t, float(down)
    hd = spec.head_dim
    qo = 2 * D * H * hd
    kv = 2 * D * spec.num_kv_heads * hd
    rest = total - qo - kv  # biases and q/k norms: small, counted as replicated
    return qo / t + kv * kv_heads_per_gpu(spec, t) / spec.num_kv_heads, float(rest)


@dataclass(frozen=True)
class WeightBytes:
    """Weight bytes on one GPU, by part."""

    routed_experts: float
    attention: float
    dense_and_shared_mlp: float
    embedding_and_head: float
    other: float  # norms and router (replicated)

    @property
    def non_expert(self) -> float:
        return self.attention + self.dense_and_shared_mlp + self.embedding_and_head + self.other

    @property
    def total(self) -> float:
        return self.routed_experts + self.non_expert


def weight_bytes(spec: ModelSpec, layout: Layout, dtype: str = "bf16") -> WeightBytes:
    """Bytes of weights one GPU holds under `layout` (rules in the module docstring)."""
    D, V, t = spec.hidden_size, spec.vocab_size, layout.attn_tp
    bw_d = bytes_per_weight(dtype, D)
    split, repl = attention_params_per_gpu(spec, t)
    attention = spec.num_layers * (split * bw_d + repl * 2.0)
    L_moe, L_dense = spec.num_moe_layers, len(spec.dense_layers)
    mlp = (L_moe * 3 * D * spec.shared_intermediate_size + L_dense * 3 * D * spec.intermediate_size) / t * bw_d
    emb = V * D * (1 if spec.tie_word_embeddings else 2) / t * 2.0
    moe = spec.moe_layer_params()
    other = (spec.num_layers * 2 * D + D + L_moe * moe["router"]) * 2.0
    I = spec.moe_intermediate_size
    per_expert = (2 * I * D * bw_d + D * I * bytes_per_weight(dtype, I)) / layout.moe_tp
    experts = L_moe * layout.local_experts(spec) * per_expert
    return WeightBytes(experts, attention, mlp, emb, other)


@dataclass(frozen=True)
class EngineLimits:
    """The engine knobs that size activations and graphs (EngineConfig's defaults)."""

    max_num_batched_tokens: int = 8192
    max_num_seqs: int = 256
    cuda_graph_max_bs: int = 256
    block_size: int = 16
    act_bytes: int = 2


def activation_bytes_per_token(spec: ModelSpec, layout: Layout, act_bytes: int = 2) -> float:
    D, t = spec.hidden_size, layout.attn_tp
    if spec.attention == "mla":
        qkv = spec.num_heads / t * (spec.qk_head_dim + spec.v_head_dim) + spec.kv_lora_rank + spec.qk_rope_head_dim
    else:
        qkv = (spec.num_heads / t + 2 * kv_heads_per_gpu(spec, t)) * spec.head_dim
    pairs = min(spec.top_k, layout.local_experts(spec))
    return act_bytes * (3 * D + qkv + pairs * (D + 3 * spec.moe_intermediate_size / layout.moe_tp))


@dataclass(frozen=True)
class MemoryReport:
    """Bytes per GPU of one deployment and what is left for the KV cache."""

    layout: Layout
    dtype: str
    kv_dtype: str
    weights: WeightBytes
    activations: float
    cuda_graphs: float
    comm_buffers: float
    budget: float
    kv_per_token: float  # bytes per token on each GPU of the token's replica
    block_size: int
    max_position: int

    @property
    def used(self) -> float:
        return self.weights.total + self.activations + self.cuda_graphs + self.comm_buffers

    @property
    def kv_free(self) -> float:
        return self.budget - self.used

    @property
    def kv_tokens(self) -> int:
        """Tokens of KV cache one attention replica can hold (whole blocks)."""
        if self.kv_free <= 0:
            return 0
        blocks = int(self.kv_free // (self.kv_per_token * self.block_size))
        return blocks * self.block_size

    def max_batch(self, context: int) -> int:
        """Largest number of sequences of `context` tokens (prompt + output) that fit, all replicas together."""
        per_seq = -(-context // self.block_size) * self.block_size
        return (self.kv_tokens // per_seq) * self.layout.attn_dp

    def fit(self, batch: int, context: int) -> tuple[bool, str]:
        """Whether `batch` sequences of `context` tokens fit at once, and the reason when they do not."""
        gb = 1e9
        if context > self.max_position:
            return False, f"context {context} exceeds the model's {self.max_position} positions"
        if self.weights.total > self.budget:
            return False, (f"weights {self.weights.total / gb:.1f} GB/GPU exceed the usable "
                           f"{self.budget / gb:.1f} GB")
        if self.kv_free <= 0:
            return False, (f"weights {self.weights.total / gb:.1f} + activations and graphs "
                           f"{(self.activations + self.cuda_graphs + self.comm_buffers) / gb:.1f} GB leave no "
                           f"room for KV in {self.budget / gb:.1f} GB")
        m = self.max_batch(context)
        if m < batch:
            seqs = -(-batch // self.layout.attn_dp)
            need = seqs * -(-context // self.block_size) * self.block_size * self.kv_per_token
            return False, (f"KV for {batch} x {context} tokens needs {need / gb:.1f} GB/GPU, "
                           f"{self.kv_free / gb:.1f} GB free: at most {m} sequences at once")
        return True, f"fits: KV room for {m} sequences of {context} tokens"


def memory_report(spec: ModelSpec, layout: Layout, cluster: Cluster, dtype: str = "bf16",
                  kv_dtype: str = "bf16", limits: EngineLimits | None = None) -> MemoryReport:
    """Per-GPU memory of `spec` under `layout` on `cluster` (rules in the module docstring)."""
    if layout.gpus != cluster.gpus:
        raise ValueError(f"layout {layout.name} uses {layout.gpus} GPUs, the cluster has {cluster.gpus}")
    lim = limits or EngineLimits()
    w = weight_bytes(spec, layout, dtype)
    per_tok = activation_bytes_per_token(spec, layout, lim.act_bytes)
    logits = lim.max_num_seqs * math.ceil(spec.vocab_size / layout.attn_tp) * 4.0
    act = lim.max_num_batched_tokens * per_tok + logits
    graphs = min(lim.cuda_graph_max_bs, lim.max_num_seqs) * per_tok
    comm = 0.0 if layout.gpus == 1 else COMM_BUFFER + (ALL_TO_ALL_BUFFER if layout.all_to_all else 0.0)
    return MemoryReport(layout, dtype, kv_dtype, w, act, graphs, comm, cluster.usable_memory,
                        kv_bytes_per_token(spec, layout.attn_tp, kv_dtype), lim.block_size,
                        spec.max_position_embeddings)
