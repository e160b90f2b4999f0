"""Report figures (matplotlib, Agg): each returns a Figure record with its PNG bytes, title, caption and the run
ids of the points it draws, so every figure can name its sources.

Points (one row per benchmark run, see moelab.lab.report.points): throughput lines carry error bars from the
trials' min to max; out-of-memory points of the hyperparameter study are drawn as red crosses on the x axis.
"""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any

import numpy as np


@dataclass
class Figure:
    title: str
    png: bytes
    caption: str
    run_ids: list[str] = field(default_factory=list)


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any, tight: bool = True) -> bytes:
    """PNG bytes of fig, closed afterwards; tight=False for figures with their own layout engine."""
    buf = io.BytesIO()
    if tight:
        fig.tight_layout()
    fig.savefig(buf, format="png", dpi=100)
    _plt().close(fig)
    return buf.getvalue()


def _log2_ticks(ax: Any, values: list) -> None:
    """A log2 x axis labelled with the measured values themselves (1, 16, 128 rather than 2^0, 2^4, 2^7)."""
    ax.set_xscale("log", base=2)
    ax.set_xticks(values)
    ax.set_xticklabels([f"{v:g}" for v in values], fontsize=8)
    ax.minorticks_off()


def _natural(v: Any) -> tuple:
    """Sort key: numbers numerically, "128/64" by its parts, other strings after them."""
    parts = str(v).split("/")
    try:
        return (0, *(float(p) for p in parts))
    except ValueError:
        return (1, str(v))


def _lines(ax: Any, df: Any, x: str, y: str, series: str, err: bool = False, style: str = "-o",
           label_fmt: str = "{}") -> None:
    for key, g in sorted(df.groupby(series), key=lambda kv: _natural(kv[0])):
        agg = {y: "median"}  # repeated runs of one point: median value, widest trial range
        agg.update({c: f for c, f in ((f"{y}_min", "min"), (f"{y}_max", "max")) if c in g})
        g = g.groupby(x, as_index=False).agg(agg).sort_values(x)
        kw = dict(label=label_fmt.format(key), marker=style[-1], linestyle=style[:-1] or "-", ms=4)
        if err and f"{y}_min" in g and g[f"{y}_min"].notna().all():
            lo, hi = g[y] - g[f"{y}_min"], g[f"{y}_max"] - g[y]
            ax.errorbar(g[x], g[y], yerr=[lo, hi], capsize=2, **kw)
        else:
            ax.plot(g[x], g[y], **kw)


def line_figure(pts: Any, x: str, y: str, series: str, title: str, ylabel: str, caption: str, logx: bool = False,
                scale: float = 1.0, series_label: str = "{}") -> Figure | None:
    """y vs x with one line per value of `series` (ok points only). None when x has fewer than 2 values."""
    ok = pts[(pts["status"] == "ok") & pts[y].notna()] if y in pts else pts.iloc[0:0]
    if ok.empty or ok[x].nunique() < 2:
        return None
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6.4, 3.9))
    d = ok.copy()
    for c in (y, f"{y}_min", f"{y}_max"):
        if c in d:
            d[c] = d[c] * scale
    _lines(ax, d, x, y, series, err=True, label_fmt=series_label)
    if logx:
        _log2_ticks(ax, sorted(ok[x].unique()))
    ax.set_xlabel(x)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, title=series, title_fontsize=8)
    return Figure(title, _png(fig), caption, sorted(ok["run_id"]))


def latency_figure(pts: Any, title: str, caption: str) -> Figure | None:
    """TTFT (one-token run, solid; per-token timestamps, dashed) and median ITL vs batch, one line per length."""
    ok = pts[pts["status"] == "ok"]
    have = [c for c in ("ttft_oneshot", "ttft_median", "itl_median") if c in ok and ok[c].notna().any()]
    if not have or ok["batch"].nunique() < 2:
        return None
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.9))
    d = ok.copy()
    for c in have:
        d[c] = d[c] * 1e3
    if "ttft_oneshot" in have:
        _lines(a, d, "batch", "ttft_oneshot", "length", label_fmt="len {} one-token")
    if "ttft_median" in have:
        _lines(a, d, "batch", "ttft_median", "length", style="--s", label_fmt="len {} timestamps")
    if "itl_median" in have:
        _lines(b, d, "batch", "itl_median", "length", label_fmt="len {}")
    for ax, name in ((a, "TTFT (ms)"), (b, "median ITL (ms)")):
        _log2_ticks(ax, sorted(ok["batch"].unique()))
        ax.set_xlabel("batch")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    return Figure(title, _png(fig), caption, sorted(ok["run_id"]))


def hparams_figure(pts: Any, title: str, caption: str) -> Figure | None:
    """Throughput vs expert FFN size, one line per top-k, one panel per expert count; OOM points as red x."""
    need = {"ffn", "experts", "top_k"}
    if not need <= set(pts.columns) or pts["ffn"].nunique() < 2:
        return None
    plt = _plt()
    experts = sorted(pts["experts"].dropna().unique())
    fig, axes = plt.subplots(1, len(experts), figsize=(3.2 * len(experts), 3.6), sharey=True, squeeze=False)
    for ax, e in zip(axes[0], experts):
        sub = pts[pts["experts"] == e]
        ok = sub[(sub["status"] == "ok") & sub["throughput"].notna()] if "throughput" in sub else sub.iloc[0:0]
        if not ok.empty:
            _lines(ax, ok, "ffn", "throughput", "top_k", label_fmt="top-{}")
        bad = sub[sub["status"] == "oom"]
        if not bad.empty:
            ax.scatter(bad["ffn"], np.zeros(len(bad)), marker="x", color="red", label="OOM", zorder=3)
        _log2_ticks(ax, sorted(pts["ffn"].dropna().unique()))
        ax.set_title(f"{int(e)} experts", fontsize=9)
        ax.set_xlabel("expert FFN size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0][0].set_ylabel("throughput (tok/s)")
    fig.suptitle(title, fontsize=10)
    return Figure(title, _png(fig), caption, sorted(pts["run_id"]))


def breakdown_figure(bd: Any, title: str, caption: str) -> Figure | None:
    """Stacked horizontal bars: share of time per category, one bar per (profile run, device)."""
    if bd.empty:
        return None
    plt = _plt()
    piv = bd.pivot_table(index="label", columns="category", values="share", aggfunc="sum").fillna(0.0)
    fig, ax = plt.subplots(figsize=(9, 1.6 + 0.4 * len(piv)))
    left = np.zeros(len(piv))
    for cat in piv.columns:
        ax.barh(piv.index, piv[cat], left=left, label=cat)
        left += piv[cat].to_numpy()
    ax.set_xlabel("% of profiled time")
    ax.set_xlim(0, 100)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.tick_params(axis="y", labelsize=7)
    ax.set_title(title, fontsize=10)
    return Figure(title, _png(fig), caption, sorted(bd["run_id"].unique()))
