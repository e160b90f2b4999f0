"""Load-balance metrics of expert routing: imbalance, CV, Gini, entropy, hot/cold experts, co-activation, drift.

Every metric takes a load vector x (tokens per expert, or per GPU) of n >= 1 non-negative entries. Conventions
for the degenerate cases, so that per-step and per-layer tables never hold NaN for an idle step: an all-zero
vector and a single entry are "perfectly balanced" (imbalance 1, CV 0, Gini 0, normalized entropy 1).
Loads of experts in different layers are never pooled: expert e of layer 0 and of layer 1 are unrelated.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from moelab.analysis.trace import RoutingTrace

HOT_FACTOR = 2.0  # hot: load >= 2 x the mean load of its layer
COLD_FACTOR = 0.25  # cold: load <= 0.25 x the mean


def _vec(x: Any) -> np.ndarray:
    v = np.asarray(x, dtype=np.float64)
    if v.ndim != 1 or v.size == 0:
        raise ValueError(f"a load vector must be 1-D and non-empty, got shape {v.shape}")
    if (v < 0).any():
        raise ValueError("loads must be >= 0")
    return v


def imbalance(x: Any) -> float:
    """max(x) / mean(x): 1 = balanced, n = everything on one of n. 1.0 when all zero."""
    v = _vec(x)
    m = v.mean()
    return float(v.max() / m) if m > 0 else 1.0


def cv(x: Any) -> float:
    """Coefficient of variation std(x) / mean(x), population std (ddof 0). 0 when all zero."""
    v = _vec(x)
    m = v.mean()
    return float(v.std() / m) if m > 0 else 0.0


def gini(x: Any) -> float:
    """Gini = sum_i sum_j |x_i - x_j| / (2 n^2 mean) = (2 sum_i i x_(i)) / (n sum x) - (n + 1) / n, with x_(i)
    sorted ascending and i = 1..n. 0 = equal loads, (n - 1)/n = all load on one entry. 0 when all zero or n = 1."""
    v = np.sort(_vec(x))
    n, total = v.size, v.sum()
    if total <= 0 or n == 1:
        return 0.0
    return float(2.0 * np.dot(np.arange(1, n + 1), v) / (n * total) - (n + 1) / n)


def normalized_entropy(x: Any) -> float:
    """H(p) / ln n with p = x / sum x and 0 ln 0 = 0: 1 = uniform, 0 = one entry takes all. 1 when all zero or
    n = 1."""
    v = _vec(x)
    total = v.sum()
    if total <= 0 or v.size == 1:
        return 1.0
    p = v[v > 0] / total
    return float(-(p * np.log(p)).sum() / np.log(v.size))


def hot_cold(x: Any, hot: float = HOT_FACTOR, cold: float = COLD_FACTOR) -> tuple[np.ndarray, np.ndarray]:
    """(hot ids, cold ids): entries with load >= hot x mean, and <= cold x mean. Both empty when all zero."""
    v = _vec(x)
    m = v.mean()
    if m <= 0:
        return np.array([], dtype=np.int64), np.array([], dtype=np.int64)
    return np.flatnonzero(v >= hot * m), np.flatnonzero(v <= cold * m)


def load_metrics(x: Any) -> dict[str, float]:
    """Every scalar metric of one load vector."""
    v = _vec(x)
    h, c = hot_cold(v)
    return {"total": float(v.sum()), "min": float(v.min()), "mean": float(v.mean()), "max": float(v.max()),
            "max/mean": imbalance(v), "cv": cv(v), "gini": gini(v), "entropy": normalized_entropy(v),
            "hot": float(len(h)), "cold": float(len(c))}


def step_imbalance(counts: np.ndarray) -> np.ndarray:
    """[S, L] max/mean over experts of each step and layer (1 for an idle step). A step's slowest rank sets its
    time, so the mean of this over steps is what expert parallelism pays; it is >= the pooled imbalance."""
    c = np.asarray(counts, dtype=np.float64)
    mean = c.mean(axis=2)
    return np.where(mean > 0, c.max(axis=2) / np.where(mean > 0, mean, 1.0), 1.0)


def js_distance(p: Any, q: Any) -> float:
    """Jensen-Shannon distance sqrt(JS(P, Q)), JS = (KL(P||M) + KL(Q||M)) / 2, M = (P + Q) / 2, log base 2,
    between two load vectors normalized to distributions: 0 = same, 1 = disjoint support. NaN when either is all
    zero (no distribution)."""
    a, b = _vec(p), _vec(q)
    if a.shape != b.shape:
        raise ValueError(f"js_distance needs equal lengths, got {a.size} and {b.size}")
    if a.sum() <= 0 or b.sum() <= 0:
        return float("nan")
    a, b = a / a.sum(), b / b.sum()
    m = (a + b) / 2

    def kl(u: np.ndarray) -> float:
        nz = u > 0
        return float((u[nz] * np.log2(u[nz] / m[nz])).sum())

    return float(np.sqrt(max(0.0, (kl(a) + kl(b)) / 2)))


def drift(counts: np.ndarray, window: int) -> np.ndarray:
    """[W - 1, L] JS distance between the expert loads of consecutive windows of `window` steps (the last,
    shorter window is dropped; NaN where a window routed no token). Empty when fewer than two windows."""
    c = np.asarray(counts)
    if window < 1:
        raise ValueError(f"drift window must be >= 1 step, got {window}")
    W = c.shape[0] // window
    if W < 2:
        return np.zeros((0, c.shape[1]))
    win = c[: W * window].reshape(W, window, *c.shape[1:]).sum(axis=1)  # [W, L, E]
    return np.array([[js_distance(win[w, l], win[w + 1, l]) for l in range(c.shape[1])] for w in range(W - 1)])


def coactivation(trace: RoutingTrace) -> np.ndarray:
    """[L, E, E] int64: C[l, i, j] = tokens whose top-k in layer l holds both i and j (i != j), C[l, i, i] =
    tokens routed to i. Symmetric. Needs per-token ids."""
    if trace.topk_ids is None:
        raise ValueError("co-activation needs per-token top-k ids; this trace has counts only "
                         f"(source {trace.source})")
    ids = trace.topk_ids.astype(np.int64)
    N, L, K = ids.shape
    E = trace.num_experts
    out = np.empty((L, E, E), dtype=np.int64)
    for l in range(L):
        a = ids[:, l, :, None] * E + ids[:, l, None, :]  # [N, K, K]
        out[l] = np.bincount(a.ravel(), minlength=E * E).reshape(E, E)
    return out


def coactivation_lift(C: np.ndarray, tokens: int) -> np.ndarray:
    """Observed over independent co-activation: lift[i, j] = C[i, j] N / (C[i, i] C[j, j]) for i != j (1 =
    independent, > 1 = chosen together more often); 0 where an expert got no token; diagonal set to 0."""
    C = np.asarray(C, dtype=np.float64)
    d = np.diagonal(C, axis1=-2, axis2=-1)
    denom = d[..., :, None] * d[..., None, :]
    lift = np.where(denom > 0, C * tokens / np.where(denom > 0, denom, 1.0), 0.0)
    idx = np.arange(C.shape[-1])
    lift[..., idx, idx] = 0.0
    return lift


def layer_table(trace: RoutingTrace, drift_window: int | None = None) -> pd.DataFrame:
    """One row per MoE layer with load_metrics of its tokens per expert (all steps pooled), the mean per-step
    max/mean ("step max/mean"), the hottest expert and its share, and the mean drift (JS distance between
    consecutive windows of drift_window steps, default max(1, S // 8)); then an "all layers" row: the mean of
    each column over layers (totals summed), and a "worst layer" row: the max (entropy: the min)."""
    c = trace.counts
    step = step_imbalance(c).mean(axis=0) if trace.num_steps else np.ones(trace.num_layers)
    window = drift_window or max(1, trace.num_steps // 8)
    d = drift(c, window)
    rows = []
    for l, layer in enumerate(trace.layer_ids):
        x = c[:, l].sum(axis=0)
        m = load_metrics(x)
        top = int(np.argmax(x))
        rows.append({"layer": layer, **m, "step max/mean": float(step[l]), "top expert": top,
                     "top share": float(x[top] / m["total"]) if m["total"] else 0.0,
                     "drift": float(np.nanmean(d[:, l])) if len(d) and not np.isnan(d[:, l]).all() else np.nan})
    df = pd.DataFrame(rows)
    num = df.drop(columns=["layer", "top expert"])
    mean = num.mean()
    mean["total"] = num["total"].sum()
    worst = num.max()
    worst["entropy"] = num["entropy"].min()
    worst["total"] = num["total"].sum()
    extra = pd.DataFrame([{"layer": "all layers", **mean}, {"layer": "worst layer", **worst}])
    return pd.concat([df, extra], ignore_index=True)


def gpu_load(trace: RoutingTrace, placement: Any) -> np.ndarray:
    """[L, G] tokens-expert pairs each rank serves over the whole trace under a Placement:
    load[l, r] = sum_e counts[l, e] * share(e, r)."""
    if placement.num_experts != trace.num_experts or placement.num_layers not in (1, trace.num_layers):
        raise ValueError(f"placement for {placement.num_experts} experts x {placement.num_layers} layers does not "
                         f"match the trace's {trace.num_experts} x {trace.num_layers}")
    pooled = trace.counts.sum(axis=0).astype(np.float64)  # [L, E]
    return np.stack([pooled[l] @ placement.share_matrix(l) for l in range(trace.num_layers)])
