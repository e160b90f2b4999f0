"""Recommender: rank every parallel layout of a model on a cluster by predicted throughput of a workload.

The prediction is analytic (moelab.analysis.throughput: roofline per GPU plus communication); memory comes from
moelab.analysis.memory. Layouts that fit come first, fastest first; the rest follow with the reason they do not.
Each row carries a one-line why: where the decode step's time goes and what caps the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from moelab.analysis.hardware import Cluster
from moelab.analysis.layout import Layout, candidate_layouts
from moelab.analysis.memory import EngineLimits, MemoryReport, memory_report
from moelab.analysis.throughput import RunEstimate, Workload, estimate_run
from moelab.spec import ModelSpec

_PART_NAMES = {"weights": "weight reads", "kv": "KV reads", "activations": "activation traffic",
               "compute": "matmul compute", "comm": "communication"}


@dataclass(frozen=True)
class Recommendation:
    layout: Layout
    memory: MemoryReport
    estimate: RunEstimate | None  # None: does not fit
    why: str

    @property
    def fits(self) -> bool:
        return self.estimate is not None


def _why(est: RunEstimate, best: RunEstimate | None) -> str:
    parts = est.decode_step.parts
    total = sum(parts.values()) or 1.0
    top = sorted(parts.items(), key=lambda kv: -kv[1])[:2]
    text = "decode: " + ", ".join(f"{_PART_NAMES[k]} {100 * v / total:.0f}%" for k, v in top if v > 0)
    wl = est.workload
    if est.waves > 1:
        text += f"; KV holds {est.concurrency} of {wl.batch} sequences ({est.waves} waves)"
    if best is not None and best is not est:
        ratio = best.output_tok_s / est.output_tok_s
        text += "; ties #1" if ratio < 1.005 else f"; {ratio:.2f}x slower than #1"
    return text


def recommend(spec: ModelSpec, cluster: Cluster, workload: Workload, dtype: str = "bf16", kv_dtype: str = "bf16",
              limits: EngineLimits | None = None, layouts: list[Layout] | None = None,
              imbalance: float | None = None) -> list[Recommendation]:
    """Every candidate layout (default: candidate_layouts for the cluster), fitting ones first by predicted
    output tokens/s (the same order as total tokens/s for a fixed workload), then the others."""
    layouts = layouts if layouts is not None else candidate_layouts(spec, cluster.gpus, cluster.node_size)
    scored: list[tuple[Layout, MemoryReport, RunEstimate | None, str]] = []
    for lay in layouts:
        mem = memory_report(spec, lay, cluster, dtype, kv_dtype, limits)
        est = estimate_run(spec, lay, cluster, workload, dtype, kv_dtype, limits, imbalance)
        reason = "" if est else mem.fit(1, workload.context)[1]
        scored.append((lay, mem, est, reason))
    fitting = sorted((s for s in scored if s[2]), key=lambda s: -s[2].output_tok_s)
    best = fitting[0][2] if fitting else None
    out = [Recommendation(lay, mem, est, _why(est, best)) for lay, mem, est, _ in fitting]
    rest = sorted((s for s in scored if not s[2]), key=lambda s: s[1].weights.total)
    return out + [Recommendation(lay, mem, None, "does not fit: " + r) for lay, mem, _, r in rest]


def recommendation_table(recs: list[Recommendation]) -> pd.DataFrame:
    """One row per layout: rank, layout, memory per GPU (GB), max concurrent sequences, predicted times and
    throughputs (NaN when it does not fit), why."""
    rows = []
    for i, r in enumerate(recs, 1):
        e, m = r.estimate, r.memory
        rows.append({
            "#": i if r.fits else "-",
            "layout": r.layout.name,
            "weights GB/GPU": round(m.weights.total / 1e9, 1),
            "KV free GB/GPU": round(max(0.0, m.kv_free) / 1e9, 1),
            "seqs at once": e.concurrency if e else 0,
            "prefill s": round(e.prefill_seconds, 3) if e else float("nan"),
            "decode ms/step": round(e.decode_step.seconds * 1e3, 2) if e else float("nan"),
            "out tok/s": float(round(e.output_tok_s)) if e else float("nan"),
            "total tok/s": float(round(e.total_tok_s)) if e else float("nan"),
            "why": r.why,
        })
    return pd.DataFrame(rows)
