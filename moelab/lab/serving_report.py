"""What a serving benchmark point leaves behind: vLLM's printed report, the result JSON files, and the rows of the
results store (one run of kind "serve" per point; every number of the result as a row, latencies in ms, keyed by
request_rate and max_concurrency; the result JSON as an artifact)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Any

from moelab.lab.serving_metrics import METRICS

if TYPE_CHECKING:
    from moelab.lab.serving import BenchConfig


def format_report(res: dict, percentiles: list[float]) -> str:
    """vLLM's printed report: the same labels in the same order."""
    rows: list[tuple[str, Any]] = [("Successful requests", res["completed"]), ("Failed requests", res["failed"])]
    if res["max_concurrency"] is not None:
        rows.append(("Maximum request concurrency", res["max_concurrency"]))
    if res["request_rate"] != "inf":
        rows.append(("Request rate configured (RPS)", f"{res['request_rate']:.2f}"))
    rows += [("Benchmark duration (s)", f"{res['duration']:.2f}"), ("Total input tokens", res["total_input_tokens"]),
             ("Total generated tokens", res["total_output_tokens"]),
             ("Request throughput (req/s)", f"{res['request_throughput']:.2f}")]
    if res["request_goodput"] is not None:
        rows.append(("Request goodput (req/s)", f"{res['request_goodput']:.2f}"))
    rows += [("Output token throughput (tok/s)", f"{res['output_throughput']:.2f}"),
             ("Peak output token throughput (tok/s)", f"{res['max_output_tokens_per_s']:.2f}"),
             ("Peak concurrent requests", res["max_concurrent_requests"]),
             ("Total token throughput (tok/s)", f"{res['total_token_throughput']:.2f}")]
    lines = ["{s:{c}^60}".format(s=" Serving Benchmark Result ", c="=")]
    lines += [f"{k:<44}{v:>16}" for k, v in rows]
    titles = {"ttft": ("Time to First Token", "TTFT"), "tpot": ("Time per Output Token (excl. 1st token)", "TPOT"),
              "itl": ("Inter-token Latency", "ITL"), "e2el": ("End-to-end Latency", "E2EL")}
    for m in METRICS:
        title, short = titles[m]
        lines.append("{s:{c}^60}".format(s=f" {title} ", c="-"))
        for label, key in [("Mean", f"mean_{m}_ms"), ("Median", f"median_{m}_ms"),
                           *[(f"P{p:g}", f"p{p:g}_{m}_ms") for p in percentiles]]:
            v = res[key]
            lines.append(f"{label + ' ' + short + ' (ms)':<44}{'n/a (no sample)' if v is None else f'{v:.2f}':>16}")
    for reason, count in res["failed_reasons"].items():
        lines.append(f"failed x{count}: {reason}")
    lines.append("=" * 60)
    return "\n".join(lines)


STORE_UNITS = {"duration": "s", "completed": "requests", "failed": "requests", "total_input_tokens": "tokens",
               "total_output_tokens": "tokens", "request_throughput": "req/s", "request_goodput": "req/s",
               "output_throughput": "tok/s", "total_token_throughput": "tok/s", "max_output_tokens_per_s": "tok/s",
               "max_concurrent_requests": "requests"}


def store_rows(res: dict) -> list[dict]:
    """Tidy rows: every number of the result (latencies in ms), keyed by the point's rate and concurrency."""
    point = {"request_rate": res["request_rate"], "max_concurrency": res["max_concurrency"]}
    rows = [{"metric": k, "value": float(res[k]), "unit": u, **point} for k, u in STORE_UNITS.items()
            if res.get(k) is not None]
    rows += [{"metric": k, "value": float(v), "unit": "ms", **point} for k, v in res.items()
             if k.endswith("_ms") and isinstance(v, (int, float))]
    return rows


def store_point(store: Any, cfg: BenchConfig, res: dict | None, rate: float, conc: int | None,
                 error: str | None = None) -> str:
    """One store run (kind "serve") for one point: its rows and result JSON, or the error that stopped it."""
    config = {"base_url": cfg.base_url, "model": res["model_id"] if res else cfg.model, "backend": cfg.backend,
              "endpoint": cfg.path, "label": cfg.label, "request_rate": "inf" if math.isinf(rate) else rate,
              "max_concurrency": conc, "burstiness": cfg.burstiness, **cfg.metadata}
    workload = {"dataset": cfg.dataset, "num_prompts": cfg.num_prompts, "input_len": cfg.input_len,
                "output_len": cfg.output_len, "range_ratio": cfg.range_ratio, "seed": cfg.seed,
                "temperature": cfg.temperature, "dataset_path": cfg.dataset_path}
    run_id = store.start_run("serve", config, workload)
    if res is None:
        store.finish_run(run_id, "failed", error=error)
        return run_id
    store.add(run_id, store_rows(res))
    if hasattr(store, "add_artifact"):
        store.add_artifact(run_id, "result.json", json.dumps({k: v for k, v in res.items() if k != "detailed"}),
                           mime="application/json")
    store.finish_run(run_id, "ok" if res["completed"] else "failed",
                     error=None if res["completed"] else "no request completed")
    return run_id


def save_results(results: list[dict], result_dir: str, filename: str | None, detailed: bool,
                 append: bool = False) -> list[Path]:
    """One JSON file per point, named like vLLM's: {label}-{rate}qps[-concurrency{C}]-{model}-{date}.json.
    append (vLLM's --append-result): each point is added as one line to its file (with --result-filename, every
    point of a sweep to that one file), so the file holds newline-delimited objects from run after run."""
    out_dir = Path(result_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for res in results:
        conc = f"-concurrency{res['max_concurrency']}" if res["max_concurrency"] else ""
        name = filename if filename and (len(results) == 1 or append) else (
            f"{res['label'] or 'moelab'}-{res['request_rate']}qps{conc}-{Path(res['model_id']).name}-{res['date']}"
            ".json")
        body = res if detailed else {k: v for k, v in res.items() if k != "detailed"}
        with open(out_dir / name, "a" if append else "w") as f:
            f.write(json.dumps(body) + "\n")
        paths.append(out_dir / name)
    return paths
