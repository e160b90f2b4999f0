"""The floor of a piece of inference work: bytes it must move and FLOPs it must do, over measured ceilings.

floor = max(bytes / copy_bandwidth, flops / matmul_rate). Every speed moelab reports is read against it
(../shared/guide/MEASURING.md). This module is pure arithmetic on a ModelSpec (no torch), so the lab and the
reports can use it without a GPU. Weights are counted once per step (a step reads each weight it uses once),
the KV cache once per sequence, activations are ignored (small next to weights at decode).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from moelab.spec import ModelSpec


@dataclass(frozen=True)
class Ceilings:
    """Measured limits of one machine: copy bandwidth in bytes/s (read + write), dense matmul rate in FLOP/s."""

    bandwidth: float
    matmul: float
    name: str = ""


@dataclass(frozen=True)
class Floor:
    bytes: float
    flops: float
    seconds: float
    bound: str  # "memory" | "compute"

    def pct_of(self, measured_seconds: float) -> float:
        """The measured time as % of the floor's speed (100 = at the limit)."""
        return 100.0 * self.seconds / measured_seconds

    def __add__(self, other: Floor) -> Floor:
        s = self.seconds + other.seconds
        return Floor(self.bytes + other.bytes, self.flops + other.flops, s,
                     self.bound if self.seconds >= other.seconds else other.bound)


def floor_of(nbytes: float, flops: float, c: Ceilings) -> Floor:
    tb, tf = nbytes / c.bandwidth, flops / c.matmul
    return Floor(nbytes, flops, max(tb, tf), "memory" if tb >= tf else "compute")


def touched_experts_uniform(num_experts: int, top_k: int, tokens: int) -> float:
    """Expected distinct experts hit by `tokens` tokens each choosing top_k of num_experts uniformly."""
    return num_experts * (1.0 - (1.0 - top_k / num_experts) ** tokens)


def moe_layer_floor(E: int, K: int, D: int, I: int, M: int, c: Ceilings, weight_bytes: float = 2.0,
                    act_bytes: float = 2.0, touched: float | None = None) -> Floor:
    """One SiLU-gated MoE layer over M tokens: FLOPs 2*M*K*3*D*I, bytes = touched experts' weights + x in/out."""
    t = touched_experts_uniform(E, K, M) if touched is None else touched
    return floor_of(t * 3 * D * I * weight_bytes + 2 * M * D * act_bytes, 2.0 * M * K * 3 * D * I, c)


def _dense_weight_params(spec: ModelSpec) -> int:
    """Weights a step reads once whatever its tokens: everything but routed experts and the embedding table; the
    LM head included (tied: the table itself, read whole as the LM head)."""
    pc = spec.param_counts()
    b = pc.breakdown
    return pc.total - b["routed_experts"] - b["embedding"] + (b["embedding"] if spec.tie_word_embeddings else 0)


def step_floor(spec: ModelSpec, new_tokens: Sequence[int], context_lens: Sequence[int], c: Ceilings,
               touched: Sequence[float] | None = None, weight_bytes: float = 2.0, kv_bytes: float = 2.0,
               logits_rows: int | None = None) -> Floor:
    """One engine step: sequence i feeds new_tokens[i] tokens and ends with context_lens[i] tokens of KV.

    touched: distinct routed experts per MoE layer in this step (observed routing); default the uniform
    expectation. logits_rows: rows through the LM head (default: one per sequence).
    """
    T = sum(new_tokens)
    E, K, D = spec.num_experts, spec.top_k, spec.hidden_size
    L_moe = spec.num_moe_layers
    if touched is None:
        touched = [touched_experts_uniform(E, K, T)] * L_moe
    if len(touched) != L_moe:
        raise ValueError(f"touched has {len(touched)} entries; the model has {L_moe} MoE layers")
    rows = len(new_tokens) if logits_rows is None else logits_rows
    lm_head = spec.vocab_size * D
    dense = _dense_weight_params(spec) - lm_head  # the LM head once, tied to the embedding table or not
    nbytes = (dense + lm_head + sum(touched) * spec.expert_params()) * weight_bytes
    nbytes += T * D * weight_bytes  # embedding rows
    # KV: every sequence reads its whole context once and writes its new tokens
    per_tok = spec.kv_bytes_per_token(1) * kv_bytes
    nbytes += sum(context_lens) * per_tok + T * per_tok
    # FLOPs: matmuls of the active path per token, the LM head per sampled row, attention over the context
    active_per_tok = dense + K * L_moe * spec.expert_params()
    flops = 2.0 * T * active_per_tok + 2.0 * rows * lm_head
    # MLA counted in its unabsorbed form, (qk_head_dim + v_head_dim) per head and key; the engine's absorbed decode
    # does (2 kv_lora_rank + rope dim) per head and key, 3.4x more for DeepSeek-V2-Lite. Decode attention stays
    # memory-bound at any context either way (absorbed: ~30 FLOP per byte of latent cache, the H100/H200 ridge is
    # ~190-270); the choice moves compute-bound (prefill) floors only.
    v_dim = spec.v_head_dim if spec.attention == "mla" else spec.head_dim
    for n, ctx in zip(new_tokens, context_lens):
        # query j of this chunk sees ctx - n + j + 1 keys
        keys = n * (ctx - n) + n * (n + 1) / 2
        flops += 2.0 * spec.num_layers * spec.num_heads * (spec.qk_head_dim + v_dim) * keys
    return floor_of(nbytes, flops, c)


def offline_run_floor(spec: ModelSpec, batch: int, input_len: int, output_len: int, c: Ceilings,
                      max_batched_tokens: int = 8192, **kw) -> Floor:
    """Floor of generating output_len tokens for `batch` prompts of input_len tokens: prefill in chunks of the
    token budget (the first output token comes with it), then output_len - 1 decode steps of the whole batch."""
    total = Floor(0.0, 0.0, 0.0, "memory")
    per_step = max(1, max_batched_tokens // input_len)
    done = 0
    while done < batch:
        n = min(per_step, batch - done)
        total = total + step_floor(spec, [input_len] * n, [input_len] * n, c, **kw)
        done += n
    for i in range(1, output_len):
        total = total + step_floor(spec, [1] * batch, [input_len + i] * batch, c, **kw)
    return total
