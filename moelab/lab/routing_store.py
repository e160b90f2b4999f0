"""Routing traces in the results store: a run of kind "routing" holds the trace file (artifact routing.npz), its
load-balance summary as rows (overall and worst layer: max/mean, cv, gini, entropy), the recording overhead when
it was measured, and synthetic baselines' summaries beside it. The report draws its heatmaps from these runs only.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

SUMMARY_METRICS = ("max/mean", "step max/mean", "cv", "gini", "entropy", "top share", "drift")
BASELINES = ("zipf:1.2", "hotset:0.1:0.5")


def store_trace(store: Any, path: str | Path, overhead: dict | None = None, baselines: tuple[str, ...] = BASELINES,
                seed: int = 0) -> str:
    """Record the trace file at path as a "routing" run; returns its run id."""
    from moelab.analysis.balance import layer_table
    from moelab.analysis.synthetic import baseline_summary
    from moelab.analysis.trace import RoutingTrace

    trace = RoutingTrace.load(path)
    config = {"model": trace.model, "source": trace.source, "num_experts": trace.num_experts, "top_k": trace.top_k,
              "num_layers": trace.num_layers}
    workload = {**trace.workload, "steps": trace.num_steps, "tokens": int(trace.num_tokens)}
    run_id = store.start_run("routing", config, workload, extra={"trace": trace.meta(), "overhead": overhead})
    table = layer_table(trace)
    rows = []
    for label, row in (("all layers", table.iloc[-2]), ("worst layer", table.iloc[-1])):
        rows += [{"metric": m, "value": float(row[m]), "unit": "", "routing": "trace", "scope": label}
                 for m in SUMMARY_METRICS if m in row]
    if baselines:
        summ = baseline_summary(trace, list(baselines), seed).set_index("routing")
        for name, row in summ.iloc[1:].iterrows():
            rows += [{"metric": m, "value": float(row[m]), "unit": "", "routing": name, "scope": "all layers"}
                     for m in SUMMARY_METRICS if m in row]
    if overhead and overhead.get("overhead_pct") is not None:
        rows.append({"metric": "recording_overhead", "value": float(overhead["overhead_pct"]), "unit": "%"})
    store.add(run_id, rows)
    store.add_artifact(run_id, "routing.npz", Path(path).read_bytes(), "application/x-npz")
    store.finish_run(run_id)
    return run_id


def stored_traces(store: Any) -> list[tuple[str, Any]]:
    """(run id, RoutingTrace) of every ok routing run that has its trace file."""
    from moelab.analysis.trace import RoutingTrace

    runs = store.runs(kind="routing", status="ok")
    out = []
    for run_id in (runs["run_id"] if not runs.empty else []):
        try:
            blob = store.artifact(run_id, "routing.npz")
        except ValueError:
            continue
        tmp = io.BytesIO(blob)
        out.append((run_id, RoutingTrace.load_file(tmp)))
    return out
