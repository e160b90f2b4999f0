"""Replay a RoutingTrace under a Placement: per-GPU load, imbalance, all-to-all bytes and predicted MoE time per step.

Assumptions (docs/analysis.md):
- Token sources: the T tokens of a step start spread over the G ranks in contiguous equal blocks, token i on rank
  floor(i G / T) (data-parallel attention with the batch split evenly).
- Replicas: a token's pair with expert e goes to one of e's replicas, drawn with the placement's shares (seeded),
  whatever its source rank.
- Dispatch (with per-token ids): a token is sent once to each distinct remote rank holding one of its K experts
  (per-rank deduplication, as DeepEP and pplx do), hidden_size x act_bytes bytes; combine sends the same number
  of vectors back. Without per-token ids: every pair of expert e counts, a fraction (G-1)/G from remote ranks
  (no deduplication: an upper bound).
- Link time of a layer's dispatch: the busiest rank's max(send, receive) time, NVLink bytes / intra_node_bw +
  network bytes / inter_node_bw, + link_latency; combine costs the same.
- Expert compute of a layer: moelab.roofline.moe_layer_floor of each rank's pairs and touched local experts; the
  slowest rank sets the layer's time. MoE time of a step = sum over layers of dispatch + compute + combine, no
  overlap. Attention and dense layers are outside the simulation.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from moelab.analysis.hardware import Cluster
from moelab.analysis.placement import Placement
from moelab.analysis.trace import RoutingTrace
from moelab.roofline import moe_layer_floor


@dataclass(frozen=True)
class SimResult:
    """Per step s, layer l and rank r. Times in seconds, bytes per step summed over ranks and layers."""

    strategy: str
    step_rank_load: np.ndarray  # [S, L, G] token-expert pairs served
    compute_s: np.ndarray  # [S, L] slowest rank's expert compute
    comm_s: np.ndarray  # [S, L] dispatch + combine
    dispatch_bytes: np.ndarray  # [S, L] (combine moves the same bytes back)
    inter_node_bytes: np.ndarray  # [S, L] dispatch bytes that crossed nodes
    dedup: bool  # True when computed from per-token ids

    @property
    def rank_load(self) -> np.ndarray:
        """[L, G] pairs served over the whole trace."""
        return self.step_rank_load.sum(axis=0)

    @property
    def step_imbalance(self) -> np.ndarray:
        """[S, L] max / mean rank load (1 for an idle step)."""
        x = self.step_rank_load
        mean = x.mean(axis=2)
        return np.where(mean > 0, x.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)

    @property
    def step_s(self) -> np.ndarray:
        """[S] predicted MoE time of each step."""
        return (self.compute_s + self.comm_s).sum(axis=1)

    def summary(self) -> dict[str, float | str]:
        pooled = self.rank_load
        mean = pooled.mean(axis=1)
        pooled_imb = np.where(mean > 0, pooled.max(axis=1) / np.where(mean > 0, mean, 1.0), 1.0)
        total_b = self.dispatch_bytes.sum(axis=1)
        return {"strategy": self.strategy,
                "step max/mean": float(self.step_imbalance.mean()),
                "pooled max/mean": float(pooled_imb.mean()),
                "a2a MB/step": float(2 * total_b.mean() / 1e6),
                "inter-node %": float(100 * self.inter_node_bytes.sum() / max(1.0, self.dispatch_bytes.sum())),
                "compute ms/step": float(self.compute_s.sum(axis=1).mean() * 1e3),
                "comm ms/step": float(self.comm_s.sum(axis=1).mean() * 1e3),
                "MoE ms/step": float(self.step_s.mean() * 1e3),
                "dedup": "per token" if self.dedup else "pairs (no ids)"}


def source_ranks(tokens: int, ranks: int) -> np.ndarray:
    """[T] source rank of each token of a step: floor(i * G / T)."""
    return np.arange(tokens) * ranks // max(1, tokens)


def _replica_tables(placement: Placement, layer: int) -> tuple[np.ndarray, np.ndarray]:
    E = placement.num_experts
    reps = [placement.ranks_of(e, layer) for e in range(E)]
    width = max(len(r) for r in reps)
    ranks = np.zeros((E, width), dtype=np.int64)
    cum = np.ones((E, width))
    for e, r in enumerate(reps):
        s = np.cumsum(placement.shares_of(e, layer))
        ranks[e, : len(r)], ranks[e, len(r):] = r, r[-1]
        cum[e, : len(r)] = s
    return ranks, cum


def _token_traffic(ids: np.ndarray, G: int, ranks: np.ndarray, cum: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(pairs per rank [G], token messages [G src, G dst]) of one step and layer from per-token ids [T, K]."""
    T, K = ids.shape
    u = rng.random((T, K))
    pick = (u[..., None] >= cum[ids]).sum(axis=-1)  # replica index
    dest = ranks[ids, np.minimum(pick, ranks.shape[1] - 1)]  # [T, K]
    load = np.bincount(dest.ravel(), minlength=G).astype(np.float64)
    src = source_ranks(T, G)
    hit = np.zeros((T, G), dtype=bool)
    hit[np.arange(T)[:, None], dest] = True
    hit[np.arange(T), src] = False
    msgs = np.zeros((G, G))
    np.add.at(msgs, src, hit.astype(np.float64))
    return load, msgs


def _link_time(msgs_bytes: np.ndarray, cluster: Cluster) -> tuple[float, float]:
    """(seconds, inter-node bytes) of one all-to-all with msgs_bytes[src, dst]."""
    G = len(msgs_bytes)
    node = np.arange(G) // cluster.node_size
    same = node[:, None] == node[None, :]
    inter = np.where(same, 0.0, msgs_bytes)
    intra = msgs_bytes - inter
    send = intra.sum(1) / cluster.intra_node_bw + inter.sum(1) / cluster.inter_node_bw
    recv = intra.sum(0) / cluster.intra_node_bw + inter.sum(0) / cluster.inter_node_bw
    t = float(np.maximum(send, recv).max())
    return (t + cluster.link_latency if t > 0 else 0.0), float(inter.sum())


def simulate(trace: RoutingTrace, placement: Placement, cluster: Cluster, *, hidden_size: int | None = None,
             moe_intermediate_size: int | None = None, weight_bytes: float = 2.0, act_bytes: float = 2.0,
             seed: int = 0) -> SimResult:
    """Replay `trace` under `placement` on `cluster` (cluster.gpus == placement.num_ranks). hidden_size and
    moe_intermediate_size default to the trace's spec_fields."""
    D = hidden_size or trace.spec_fields.get("hidden_size")
    I = moe_intermediate_size or trace.spec_fields.get("moe_intermediate_size")
    if not D or not I:
        raise ValueError("simulate needs hidden_size and moe_intermediate_size (give them, a --preset, or a trace "
                         "whose spec_fields have them)")
    G = placement.num_ranks
    if cluster.gpus != G:
        raise ValueError(f"placement has {G} ranks, the cluster {cluster.gpus} GPUs")
    if placement.num_experts != trace.num_experts or placement.num_layers not in (1, trace.num_layers):
        raise ValueError(f"placement for {placement.num_experts} experts x {placement.num_layers} layers does not "
                         f"match the trace's {trace.num_experts} x {trace.num_layers}")
    S, L = trace.num_steps, trace.num_layers
    rng = np.random.default_rng(seed)
    off = trace.step_offsets()
    load = np.zeros((S, L, G))
    comp, comm, disp, inter = (np.zeros((S, L)) for _ in range(4))
    c = cluster.ceilings
    for l in range(L):
        share = placement.share_matrix(l)  # [E, G]
        held = share > 0
        local = held.sum(axis=0)
        ranks, cum = _replica_tables(placement, l)
        for s in range(S):
            counts = trace.counts[s, l].astype(np.float64)
            if trace.topk_ids is not None and G > 1:
                load[s, l], msgs = _token_traffic(trace.topk_ids[off[s]:off[s + 1], l].astype(np.int64), G, ranks,
                                                  cum, rng)
            else:
                load[s, l] = counts @ share
                msgs = np.repeat(load[s, l][None, :] / G, G, axis=0)
                np.fill_diagonal(msgs, 0.0)
            touched = (counts > 0).astype(np.float64) @ held
            comp[s, l] = max(moe_layer_floor(int(local[r]), 1, D, I, float(load[s, l, r]), c, weight_bytes,
                                             act_bytes, touched=float(touched[r])).seconds for r in range(G))
            b = msgs * D * act_bytes
            t, inter[s, l] = _link_time(b, cluster) if G > 1 else (0.0, 0.0)
            comm[s, l], disp[s, l] = 2 * t, b.sum()
    return SimResult(placement.strategy, load, comp, comm, disp, inter, trace.topk_ids is not None)


def compare(trace: RoutingTrace, placements: dict[str, Placement], cluster: Cluster, **kw: object) -> pd.DataFrame:
    """simulate() each placement; one summary row per name."""
    rows = []
    for name, p in placements.items():
        row = simulate(trace, p, cluster, **kw).summary()  # type: ignore[arg-type]
        row["strategy"] = name
        rows.append(row)
    return pd.DataFrame(rows)
