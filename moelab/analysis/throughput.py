"""Analytic step and run time of a MoE model under a Layout: the roofline per GPU plus communication.

A step on one GPU = floor(non-expert work) + L_moe * floor(MoE layer work on the busiest EP rank) + comm, with
floor = max(bytes / HBM bandwidth, FLOPs / matmul rate) (moelab.roofline) and no overlap between the parts:
- non-expert: its weights on this GPU (embedding: only the rows looked up), KV read for the context and written
  for the new tokens, matmul FLOPs 2 * tokens * params / attn_tp, attention FLOPs over the context, LM head;
- MoE layer: moe_layer_floor(...) of the busiest rank: (mean pairs) x imbalance, touched local experts under
  uniform routing, E_loc * (1 - (1 - K/E)^T_g) for T_g tokens in the MoE group;
- comm: attention TP all-reduces (ring: 2 (t-1)/t * T * D * 2 bytes / bw + latency), two per layer; with
  all-to-all layouts (DPA+EP) dispatch and combine per MoE layer: each token goes to p_hit * (G - 1) other
  GPUs, p_hit = 1 - C(E - E/ep, K) / C(E, K) (chance an EP rank holds one of its K experts), the hottest rank
  receives imbalance x the mean; NVLink for GPUs of the same node, the network for the rest.
fp8 weights (W8A8) double the matmul rate (the H100's nominal fp8/bf16 ratio, not measured); int8 is W8A16.
Prefill steps pack max(1, max_num_batched_tokens // input_len) prompts per replica; decode runs output_len - 1
steps at the mean context input_len + output_len / 2.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

from moelab.analysis.hardware import Cluster
from moelab.analysis.layout import Layout
from moelab.analysis.memory import (
    EngineLimits,
    MemoryReport,
    attention_params_per_gpu,
    memory_report,
)
from moelab.roofline import Ceilings, floor_of, moe_layer_floor
from moelab.spec import ModelSpec


@dataclass(frozen=True)
class Workload:
    """batch prompts of input_len tokens, output_len tokens generated for each (an offline run)."""

    input_len: int
    output_len: int
    batch: int

    def __post_init__(self) -> None:
        if self.input_len < 1 or self.output_len < 1 or self.batch < 1:
            raise ValueError(f"workload needs in, out and batch >= 1, got {self}")

    @classmethod
    def parse(cls, text: str) -> Workload:
        """'in=1024,out=256,batch=64' (keys in | input_len, out | output_len, batch | b)."""
        keys = {"in": "input_len", "input_len": "input_len", "out": "output_len", "output_len": "output_len",
                "batch": "batch", "b": "batch"}
        vals: dict[str, int] = {}
        for part in filter(None, text.replace(" ", "").split(",")):
            k, _, v = part.partition("=")
            if k not in keys or not re.fullmatch(r"[0-9]+", v):
                raise ValueError(f"bad workload item {part!r} in {text!r}; expected in=N,out=N,batch=N")
            vals[keys[k]] = int(v)
        missing = {"input_len", "output_len", "batch"} - set(vals)
        if missing:
            raise ValueError(f"workload {text!r} lacks {', '.join(sorted(missing))}; expected in=N,out=N,batch=N")
        return cls(**vals)

    @property
    def context(self) -> int:
        return self.input_len + self.output_len


def expected_imbalance(num_experts: int, top_k: int, tokens: float, ranks: int) -> float:
    """Expected (max rank load) / (mean rank load) of `tokens` tokens routed uniformly over `ranks` EP ranks.

    A token puts Hypergeometric(E, E/ranks, K) pairs on a rank (mean K/ranks, variance
    K p (1-p) (E-K)/(E-1), p = 1/ranks); over T tokens the max of `ranks` near-normal loads is about
    mean + sigma * sqrt(2 ln ranks). Capped at T * min(K, E/ranks) / mean (every token's pairs on one rank).
    1.0 for one rank or no tokens.
    """
    if ranks <= 1 or tokens <= 0:
        return 1.0
    p = 1.0 / ranks
    mean = tokens * top_k * p
    var = tokens * top_k * p * (1 - p) * ((num_experts - top_k) / max(1, num_experts - 1))
    f = 1.0 + math.sqrt(var) * math.sqrt(2 * math.log(ranks)) / mean
    return min(f, tokens * min(top_k, num_experts / ranks) / mean)


def rank_hit_probability(num_experts: int, top_k: int, ranks: int) -> float:
    """Chance that one EP rank holding E/ranks experts holds at least one of a token's K distinct experts."""
    if ranks <= 1:
        return 1.0
    local = num_experts // ranks
    return 1.0 - math.comb(num_experts - local, top_k) / math.comb(num_experts, top_k)


@dataclass(frozen=True)
class StepTime:
    """Seconds of one step on the busiest GPU and their attribution (parts sum to seconds)."""

    seconds: float
    parts: dict[str, float]  # weights, kv, activations, compute, comm
    comm_bytes: float  # bytes one GPU sends per step (all-reduce + all-to-all)


def _ceilings(cluster: Cluster, dtype: str) -> Ceilings:
    c = cluster.ceilings
    return replace(c, matmul=c.matmul * 2) if dtype == "fp8" else c


def _attribute(parts: dict[str, float], seconds: float, byte_split: dict[str, float], bound: str) -> None:
    if bound == "compute":
        parts["compute"] += seconds
        return
    total = sum(byte_split.values()) or 1.0
    for k, b in byte_split.items():
        parts[k] += seconds * b / total


def _allreduce(msg: float, group: int, cluster: Cluster) -> tuple[float, float]:
    """(seconds, bytes sent per GPU) of a ring all-reduce of `msg` bytes over `group` GPUs."""
    if group <= 1:
        return 0.0, 0.0
    sent = 2 * (group - 1) / group * msg
    return sent / cluster.group_bw(group) + cluster.link_latency, sent


def step_time(spec: ModelSpec, layout: Layout, cluster: Cluster, tokens: int, context_tokens: float,
              key_pairs: float, logits_rows: int, dtype: str = "bf16", kv_dtype: str = "bf16",
              imbalance: float | None = None, mem: MemoryReport | None = None) -> StepTime:
    """One step where every attention replica feeds `tokens` new tokens, reads `context_tokens` tokens of KV,
    computes attention over `key_pairs` (query, key) pairs and `logits_rows` LM-head rows (per replica)."""
    c = _ceilings(cluster, dtype)
    mem = mem or memory_report(spec, layout, cluster, dtype, kv_dtype)
    w = mem.weights
    D, V, t, E, K = spec.hidden_size, spec.vocab_size, layout.attn_tp, spec.num_experts, spec.top_k
    parts = dict(weights=0.0, kv=0.0, activations=0.0, compute=0.0, comm=0.0)
    # non-expert work on one GPU
    table = V * D / t * 2.0
    w_bytes = w.non_expert - (0.0 if spec.tie_word_embeddings else table) + tokens * D * 2.0
    kv_bytes = (context_tokens + tokens) * mem.kv_per_token
    split, repl = attention_params_per_gpu(spec, t)
    mlp = (spec.num_moe_layers * 3 * D * spec.shared_intermediate_size
           + len(spec.dense_layers) * 3 * D * spec.intermediate_size) / t
    params = spec.num_layers * (split + repl) + mlp + spec.num_moe_layers * spec.moe_layer_params()["router"]
    v_dim = spec.v_head_dim if spec.attention == "mla" else spec.head_dim
    flops = (2.0 * tokens * params + 2.0 * logits_rows * V * D / t
             + 2.0 * spec.num_layers * spec.num_heads / t * (spec.qk_head_dim + v_dim) * key_pairs)
    f = floor_of(w_bytes + kv_bytes, flops, c)
    _attribute(parts, f.seconds, {"weights": w_bytes, "kv": kv_bytes}, f.bound)
    # MoE layers: the busiest EP rank
    T_g = tokens * layout.attn_dp / layout.moe_dp
    imb = expected_imbalance(E, K, T_g, layout.moe_ep) if imbalance is None else imbalance
    pairs = T_g * K / layout.moe_ep * imb
    local = layout.local_experts(spec)
    touched = min(local, local * (1.0 - (1.0 - K / E) ** T_g)) if T_g > 0 else 0.0
    I_gpu = spec.moe_intermediate_size / layout.moe_tp
    per_expert = w.routed_experts / (spec.num_moe_layers * local)
    m = moe_layer_floor(local, 1, D, I_gpu, pairs, c, weight_bytes=per_expert / (3 * D * I_gpu), act_bytes=2.0,
                        touched=touched)
    _attribute(parts, m.seconds * spec.num_moe_layers,
               {"weights": touched * per_expert, "activations": 2 * pairs * D * 2.0}, m.bound)
    # communication
    msg = tokens * D * 2.0
    ar_s, ar_b = _allreduce(msg, t, cluster)
    comm_s, comm_b = 2 * spec.num_layers * ar_s, 2 * spec.num_layers * ar_b
    if layout.all_to_all:
        G = layout.moe_group
        src = tokens / t
        out = src * rank_hit_probability(E, K, layout.moe_ep) * (G - 1) * D * 2.0
        same_node = (min(G, cluster.node_size) - 1) / (G - 1)
        send = out * (same_node / cluster.intra_node_bw + (1 - same_node) / cluster.inter_node_bw)
        comm_s += spec.num_moe_layers * 2 * (send * imb + cluster.link_latency)
        comm_b += spec.num_moe_layers * 2 * out
    parts["comm"] = comm_s
    return StepTime(sum(parts.values()), parts, comm_b)


@dataclass(frozen=True)
class RunEstimate:
    """Predicted offline run of a workload under a layout."""

    layout: Layout
    workload: Workload
    memory: MemoryReport
    concurrency: int  # sequences in flight at once (all replicas)
    waves: int
    seconds: float
    prefill_seconds: float  # prefill of the first wave (about the TTFT of its last prompt)
    decode_step: StepTime  # one decode step of the first wave at the mean context

    @property
    def output_tok_s(self) -> float:
        return self.workload.batch * self.workload.output_len / self.seconds

    @property
    def total_tok_s(self) -> float:
        """MoE-Inference-Bench's throughput: batch x (input + output) / end-to-end time."""
        return self.workload.batch * self.workload.context / self.seconds


def _wave(spec: ModelSpec, layout: Layout, cluster: Cluster, wl: Workload, n: int, lim: EngineLimits,
          dtype: str, kv_dtype: str, mem: MemoryReport, imbalance: float | None) -> tuple[float, float, StepTime]:
    seqs = -(-n // layout.attn_dp)
    per_step = max(1, lim.max_num_batched_tokens // wl.input_len)
    prefill, done = 0.0, 0
    while done < seqs:
        k = min(per_step, seqs - done)
        T = k * wl.input_len
        prefill += step_time(spec, layout, cluster, T, 0.0, k * wl.input_len * (wl.input_len + 1) / 2, k,
                             dtype, kv_dtype, imbalance, mem).seconds
        done += k
    ctx = wl.input_len + wl.output_len / 2
    dec = step_time(spec, layout, cluster, seqs, seqs * ctx, seqs * ctx, seqs, dtype, kv_dtype, imbalance, mem)
    return prefill + (wl.output_len - 1) * dec.seconds, prefill, dec


def estimate_run(spec: ModelSpec, layout: Layout, cluster: Cluster, workload: Workload, dtype: str = "bf16",
                 kv_dtype: str = "bf16", limits: EngineLimits | None = None,
                 imbalance: float | None = None) -> RunEstimate | None:
    """Predicted time of the workload, run in waves of as many sequences as the KV cache and max_num_seqs allow;
    None when not even one sequence fits."""
    lim = limits or EngineLimits()
    mem = memory_report(spec, layout, cluster, dtype, kv_dtype, lim)
    conc = min(workload.batch, mem.max_batch(workload.context), lim.max_num_seqs * layout.attn_dp)
    if conc < 1 or workload.context > mem.max_position:
        return None
    full, rest = divmod(workload.batch, conc)
    total, prefill, dec = _wave(spec, layout, cluster, workload, conc, lim, dtype, kv_dtype, mem, imbalance)
    seconds = full * total
    if rest:
        seconds += _wave(spec, layout, cluster, workload, rest, lim, dtype, kv_dtype, mem, imbalance)[0]
    return RunEstimate(layout, workload, mem, conc, full + (1 if rest else 0), seconds, prefill, dec)

