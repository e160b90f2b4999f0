"""`moelab profile`: build the engine of a point (from flags or from a stored run), warm up, profile one
generate, and store the breakdown, the top operators and the gzipped trace as a run of kind "profile"."""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from moelab.lab.bench import BenchConfig, build_llm, effective_spec, engine_facts, needed_len
from moelab.lab.workload import Workload, make_requests

MAX_TRACE_BYTES = 64 << 20  # larger traces stay on disk only


def point_of_run(store: Any, run_id: str) -> tuple[BenchConfig, Workload]:
    """The (config, workload) a stored benchmark run was made with."""
    run = store.run(run_id)
    cfg_flat, wl = run["config"], run["workload"]
    names = {f.name for f in fields(BenchConfig)} - {"overrides"}
    kw = {k: cfg_flat[k] for k in names if k in cfg_flat}
    overrides = {k.split(".", 1)[1]: v for k, v in cfg_flat.items() if k.startswith("overrides.")}
    wl_names = {f.name for f in fields(Workload)}
    if not {"model", "batch"} <= set(kw) | set(wl):
        raise ValueError(f"run {run_id} ({run['kind']}) is not a benchmark run: no model / batch to profile")
    return BenchConfig(**kw, overrides=overrides), Workload(**{k: v for k, v in wl.items() if k in wl_names})


def profile_point(store: Any, cfg: BenchConfig, wl: Workload, run: str | None = None, out: Path | None = None
                  ) -> dict[str, Any]:
    from moelab.engine.sampling_params import SamplingParams
    from moelab.lab.profile import breakdown_rows, profile_generate

    if run:
        cfg, wl = point_of_run(store, run)
    llm = build_llm(cfg, needed_len(wl), wl.batch)
    spec = effective_spec(llm)
    prompts, out_lens = make_requests(wl, spec.vocab_size, spec.eos_token_id, llm.tokenizer, llm.engine.max_model_len)
    params = [SamplingParams(temperature=0.0, max_tokens=n, ignore_eos=True) for n in out_lens]
    llm.generate(prompts, [replace(p, max_tokens=min(p.max_tokens, 4)) for p in params])  # warm-up
    run_id = store.start_run("profile", cfg.to_dict(), wl.to_dict(), extra={"profile_of": run})
    try:
        result = profile_generate(llm, prompts, params, out)
    except Exception as err:
        store.finish_run(run_id, "failed", error=f"{type(err).__name__}: {err}")
        raise
    store.add(run_id, breakdown_rows(result))
    store.add_artifact(run_id, "breakdown.json", json.dumps(result["breakdown"]), "application/json")
    store.add_artifact(run_id, "top_ops.json", json.dumps(result["top"]), "application/json")
    trace = Path(result["trace_path"])
    stored_trace = trace.stat().st_size <= MAX_TRACE_BYTES
    if stored_trace:
        store.add_artifact(run_id, "trace.json.gz", trace.read_bytes(), "application/gzip")
    store.finish_run(run_id, extra={"trace_path": str(trace), "trace_stored": stored_trace}, config=engine_facts(llm))
    return {**result, "run_id": run_id}
