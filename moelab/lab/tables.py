"""Summary tables of stored benchmark rows: one line per run (point), trials folded into median and spread.

Columns: run_id, model, batch, input_len, output_len (workload), then per metric the median over trials, and
for throughput also its spread over trials (min, max, cv = std / mean); pct_of_floor is the median of the
throughput rows' % of floor. Latency columns use the per-trial "median" stat (TTFT, ITL, TPOT) and "p99".
Runs that ended "oom" or "failed" appear with their status and no numbers.
"""

from __future__ import annotations

from typing import Any

import numpy as np

POINT_COLS = ("model", "device", "dtype", "moe_backend", "batch", "input_len", "output_len", "top_k",
              "overrides.layers", "overrides.experts", "overrides.moe_intermediate_size", "overrides.top_k")
BENCH_KINDS = ("bench", "throughput", "latency")


def _median(df, metric: str, stat: str | None = None, col: str = "value") -> float:
    sel = df[df["metric"] == metric]
    if stat is not None and "stat" in sel.columns:
        sel = sel[sel["stat"] == stat]
    vals = sel[col].dropna()
    return float(vals.median()) if len(vals) else np.nan


def point_table(store, run_ids: list[str] | None = None, kinds: tuple[str, ...] = BENCH_KINDS):
    """One row per benchmark run of the store (or of run_ids), ok runs with numbers, others with their status."""
    import pandas as pd

    runs = store.runs(kind=list(kinds), run_id=run_ids)
    if runs.empty:
        return pd.DataFrame()
    rows = store.rows(run_id=list(runs["run_id"]), status=None)
    out: list[dict[str, Any]] = []
    for _, run in runs.iterrows():
        rec: dict[str, Any] = {"run_id": run["run_id"], "kind": run["kind"], "status": run["status"]}
        cfg, wl = run["config"], run["workload"]
        for c in POINT_COLS:
            v = cfg.get(c, wl.get(c))
            if c in ("dtype", "moe_backend", "device") and cfg.get(f"resolved.{c}"):
                v = cfg[f"resolved.{c}"]
            rec[c] = v
        rec["study"] = wl.get("study")
        r = rows[rows["run_id"] == run["run_id"]] if not rows.empty else rows
        if run["status"] == "ok" and not r.empty:
            tp = r[r["metric"] == "throughput"]["value"].dropna()
            if len(tp):
                rec["throughput"] = float(tp.median())
                rec["throughput_min"], rec["throughput_max"] = float(tp.min()), float(tp.max())
                rec["throughput_cv"] = float(tp.std(ddof=1) / tp.mean()) if len(tp) > 1 else 0.0
                rec["trials"] = int(len(tp))
            rec["output_throughput"] = _median(r, "output_throughput")
            rec["pct_of_floor"] = _median(r, "throughput", col="pct_of_floor")
            rec["ttft_oneshot"] = _median(r, "ttft_oneshot")
            rec["ttft_median"] = _median(r, "ttft", "median")
            rec["ttft_p99"] = _median(r, "ttft", "p99")
            rec["itl_median"] = _median(r, "itl", "median")
            rec["itl_p99"] = _median(r, "itl", "p99")
            rec["tpot_median"] = _median(r, "tpot", "median")
            rec["e2e_median"] = _median(r, "e2e", "median")
        out.append(rec)
    df = pd.DataFrame(out)
    return df.dropna(axis=1, how="all")


def format_table(df, cols: list[str] | None = None) -> str:
    """A plain-text table for the terminal (times in ms)."""
    if df.empty:
        return "(no runs)"
    show = df.copy()
    cols = [c for c in (cols or show.columns) if c in show.columns]
    times = [c for c in cols if c.startswith(("ttft", "itl", "tpot", "e2e"))]
    show[times] = show[times] * 1e3
    show = show[cols].rename(columns={c: f"{c}_ms" for c in times})
    return show.to_string(index=False, float_format=lambda x: f"{x:.4g}")
