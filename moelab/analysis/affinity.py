"""Co-activation-aware grouping: put experts that tokens choose together on the same rank, under a load cap.

A token is dispatched once to each remote rank holding one of its experts, so the fewer ranks its K experts span
the less all-to-all traffic. Per layer: start from the LPT placement (balanced by load, ceil(E/G) experts per
rank), then swap pairs of experts between ranks (Kernighan-Lin style, best swap first) while a swap lowers the
cut, the co-activation weight sum_{i<j, rank(i) != rank(j)} C[i, j], and keeps both ranks' loads within
cap = max(LPT's max load, (1 + tolerance) x mean load). Swapping keeps every rank's expert count.
Swap gain for a on rank A, b on rank B (aff[e, r] = sum of C[e, m] over m on r):
aff[a, B] - aff[a, A] + aff[b, A] - aff[b, B] - 2 C[a, b].
"""

from __future__ import annotations

from typing import Any

import numpy as np

from moelab.analysis.placement import Placement, lpt_pack, require_experts_per_rank


def cut_weight(C: np.ndarray, assign: np.ndarray) -> float:
    """sum over expert pairs i < j on different ranks of C[i, j] (diagonal ignored)."""
    diff = assign[:, None] != assign[None, :]
    return float(np.triu(np.where(diff, C, 0), k=1).sum())


def _refine(C: np.ndarray, w: np.ndarray, assign: np.ndarray, G: int, cap: float, max_swaps: int) -> np.ndarray:
    E = len(w)
    assign = assign.copy()
    A = C @ np.eye(G)[assign]  # [E, G] affinity of each expert to each rank
    load = np.bincount(assign, weights=w, minlength=G)
    for _ in range(max_swaps):
        M = A[:, assign]  # M[a, b] = aff[a, rank(b)]
        d = A[np.arange(E), assign]
        gain = M - d[:, None] + M.T - d[None, :] - 2 * C
        la = load[assign]
        new_a = la[:, None] - w[:, None] + w[None, :]  # a's rank after losing a and gaining b
        new_b = la[None, :] - w[None, :] + w[:, None]
        ok = (assign[:, None] != assign[None, :]) & (new_a <= cap + 1e-9) & (new_b <= cap + 1e-9)
        gain = np.where(ok, gain, -np.inf)
        a, b = np.unravel_index(int(np.argmax(gain)), gain.shape)
        if gain[a, b] <= 1e-9:
            break
        ra, rb = assign[a], assign[b]
        A[:, ra] += C[:, b] - C[:, a]
        A[:, rb] += C[:, a] - C[:, b]
        load[ra] += w[b] - w[a]
        load[rb] += w[a] - w[b]
        assign[a], assign[b] = rb, ra
    return assign


def coactivation_grouped(coact: Any, num_ranks: int, *, tolerance: float = 0.05, gpus_per_node: int = 8,
                         max_swaps: int | None = None) -> Placement:
    """Placement from co-activation counts [L, E, E] (moelab.analysis.balance.coactivation; the diagonal holds
    each expert's load) on num_ranks ranks, one rank per expert."""
    C3 = np.asarray(coact, dtype=np.float64)
    if C3.ndim == 2:
        C3 = C3[None]
    L, E, _ = C3.shape
    require_experts_per_rank(E, num_ranks)
    cap_n = -(-E // num_ranks)
    out, cuts = [], []
    for l in range(L):
        w = np.diagonal(C3[l]).copy()
        C = C3[l] - np.diag(w)
        start = lpt_pack(w, num_ranks, cap_n)
        cap = max(np.bincount(start, weights=w, minlength=num_ranks).max(), (1 + tolerance) * w.sum() / num_ranks)
        a = _refine(C, w, start, num_ranks, cap, max_swaps or 2 * E)
        out.append(a)
        cuts.append((cut_weight(C, start), cut_weight(C, a)))
    info = {"tolerance": tolerance, "cut_lpt": sum(c[0] for c in cuts), "cut": sum(c[1] for c in cuts)}
    return Placement.from_assignment(np.stack(out), num_ranks, gpus_per_node=gpus_per_node, strategy="coactivation",
                                     info=info)
