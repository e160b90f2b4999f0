"""Routing figures for reports: tokens-per-expert heatmap, co-activation heatmap, per-step imbalance.

Pure functions of a RoutingTrace returning matplotlib Figures built on the Agg canvas (no pyplot, no global
state, no display needed); the report embeds them with fig.savefig(buffer, format="png").
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from moelab.analysis.balance import coactivation, coactivation_lift, step_imbalance
from moelab.analysis.trace import RoutingTrace


def _figure(w: float, h: float) -> Figure:
    fig = Figure(figsize=(w, h), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _title(trace: RoutingTrace, what: str) -> str:
    return f"{what}\n{trace.model or 'model'} ({trace.source}, {trace.num_steps} steps, {trace.num_tokens} tokens)"


def load_heatmap(trace: RoutingTrace) -> Figure:
    """Tokens per expert per MoE layer, over the layer's mean (1 = even share), all steps pooled."""
    x = trace.counts.sum(axis=0).astype(np.float64)  # [L, E]
    mean = x.mean(axis=1, keepdims=True)
    rel = np.where(mean > 0, x / np.where(mean > 0, mean, 1), 0)
    fig = _figure(min(14, 3 + 0.05 * trace.num_experts), min(10, 2 + 0.15 * trace.num_layers))
    ax = fig.add_subplot()
    im = ax.imshow(rel, aspect="auto", cmap="magma", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(trace.num_layers), [str(i) for i in trace.layer_ids], fontsize=6)
    ax.set_title(_title(trace, "tokens per expert / layer mean"), fontsize=9)
    fig.colorbar(im, ax=ax, label="load / mean")
    return fig


def coactivation_heatmap(trace: RoutingTrace, layer: int | None = None) -> Figure:
    """Co-activation lift (observed / independent) of one layer; default the most skewed layer (largest max/mean
    tokens per expert)."""
    C = coactivation(trace)
    lift = coactivation_lift(C, trace.num_tokens)
    x = trace.counts.sum(axis=0).astype(np.float64)
    l = int(np.argmax(x.max(axis=1) / np.maximum(x.mean(axis=1), 1e-9))) if layer is None else layer
    fig = _figure(6.5, 5.5)
    ax = fig.add_subplot()
    im = ax.imshow(lift[l], cmap="viridis", interpolation="nearest", vmin=0)
    ax.set_xlabel("expert")
    ax.set_ylabel("expert")
    ax.set_title(_title(trace, f"co-activation lift, layer {trace.layer_ids[l]}"), fontsize=9)
    fig.colorbar(im, ax=ax, label="P(i and j) / (P(i) P(j))")
    return fig


def step_imbalance_plot(trace: RoutingTrace) -> Figure:
    """max/mean tokens per expert of each step: the mean over layers and the worst layer."""
    s = step_imbalance(trace.counts)  # [S, L]
    fig = _figure(7, 3.2)
    ax = fig.add_subplot()
    ax.plot(s.mean(axis=1), label="mean over layers")
    ax.plot(s.max(axis=1), label="worst layer")
    ax.set_xlabel("step")
    ax.set_ylabel("max / mean tokens per expert")
    ax.set_title(_title(trace, "per-step expert imbalance"), fontsize=9)
    ax.legend(fontsize=8)
    return fig


def routing_figures(trace: RoutingTrace) -> dict[str, Figure]:
    """{"tokens_per_expert", "step_imbalance"} and, with per-token ids, "coactivation"."""
    out = {"tokens_per_expert": load_heatmap(trace), "step_imbalance": step_imbalance_plot(trace)}
    if trace.has_token_ids:
        out["coactivation"] = coactivation_heatmap(trace)
    return out
