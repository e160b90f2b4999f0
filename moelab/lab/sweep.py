"""Sweeps: a grid (command line, YAML, a built-in study or a design CSV) of points, each measured and stored.

A point is a dict of factors (FACTORS below) over a base point. Points that share an engine configuration
share one built engine, sized for the longest and widest of them. A point that runs out of memory is stored
with status "oom", one that fails with "failed" (and the error); neither stops the sweep. --resume skips every
point whose key (the canonical JSON of its config and workload) already has an "ok" or "oom" run of the same
kind, so a sweep killed at any moment and resumed runs each point exactly once.

Built-in studies (MoE-Inference-Bench, arXiv 2508.17467):

- mib-grid: input = output length in {128, 256, 512, 1024, 2048} x batch {1, 16, 32, 64, 128}, OLMoE-1B-7B.
- mib-hparams: a Mixtral-8x7B skeleton with expert FFN {1792, 3584, 7168, 14336} x experts {8, 16, 32, 64} x
  top-k {1, 2, 4, 8}, batch 16, input = output 2048 (the paper's setting), layers reduced to 2 so the largest
  point (64 experts x FFN 14336 = 22.5 GB of expert weights per layer in bf16) fits one 80 GB GPU; the paper
  ran 32 layers on 4 x H100. The reduction is in every row (overrides.layers) and in the run's note.
"""

from __future__ import annotations

import csv
import itertools
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import fields, replace
from pathlib import Path
from typing import Any

from moelab.lab.bench import (
    BenchConfig,
    BenchOptions,
    build_llm,
    engine_facts,
    free_memory,
    measure_point,
    needed_len,
    record_point,
    workload_dict,
)
from moelab.lab.store import ResultsStore, point_key
from moelab.lab.workload import Workload

SHAPE_KEYS = ("layers", "experts", "moe_intermediate_size", "hidden_size", "heads", "kv_heads", "vocab_size")


def _bool(s: str) -> bool:
    v = s.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{s!r} is not a boolean (true/false)")


# factor -> (type, where it goes); "len" sets input_len and output_len together
FACTORS: dict[str, tuple[Callable[[str], Any], str]] = {
    "model": (str, "config"), "dtype": (str, "config"), "device": (str, "config"), "moe_backend": (str, "config"),
    "attention": (str, "config"), "top_k": (int, "config"), "max_num_batched_tokens": (int, "config"),
    "enforce_eager": (_bool, "config"), "seed": (int, "config"),
    **{k: (int, "shape") for k in SHAPE_KEYS},
    "batch": (int, "workload"), "input_len": (int, "workload"), "output_len": (int, "workload"),
    "len": (int, "workload"), "range_ratio": (float, "workload"), "workload": (str, "workload"),
    "prompts": (str, "workload"),
}

STUDIES: dict[str, dict[str, Any]] = {
    "mib-grid": {"base": {"model": "olmoe-1b-7b"},
                 "grid": {"len": [128, 256, 512, 1024, 2048], "batch": [1, 16, 32, 64, 128]},
                 "note": "MoE-Inference-Bench grid: input = output length x batch"},
    "mib-hparams": {"base": {"model": "mixtral-8x7b", "layers": 2, "batch": 16, "len": 2048},
                    "grid": {"moe_intermediate_size": [1792, 3584, 7168, 14336], "experts": [8, 16, 32, 64],
                             "top_k": [1, 2, 4, 8]},
                    "note": "MoE-Inference-Bench hyperparameter study on a Mixtral-8x7B skeleton; layers reduced "
                            "from 32 to 2 to fit one GPU (the paper used 32 layers on 4 x H100)"},
}
TINY = {"model": "olmoe-1b-7b", "device": "cpu", "layers": 2, "hidden_size": 128, "heads": 4, "kv_heads": 4,
        "experts": 8, "top_k": 2, "moe_intermediate_size": 64, "vocab_size": 512}
DEFAULT_STUDY = {"base": TINY, "grid": {"batch": [1, 4], "len": [16, 32]},
                 "note": "the default main job: a tiny synthetic OLMoE on the CPU"}


def convert(key: str, value: Any) -> Any:
    """A factor's value in its type; a clear error for an unknown factor or a bad value."""
    if key not in FACTORS:
        raise ValueError(f"unknown sweep factor {key!r}; allowed: {', '.join(FACTORS)}")
    typ = FACTORS[key][0]
    if isinstance(value, str):
        try:
            return typ(value.strip())
        except ValueError:
            raise ValueError(f"sweep factor {key}: {value!r} is not a valid {typ.__name__}") from None
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if typ is int and number and float(value).is_integer():
        return int(value)
    if typ is float and number:
        return float(value)
    if typ is _bool and isinstance(value, bool):
        return value
    raise ValueError(f"sweep factor {key}: {value!r} is not a valid {typ.__name__.lstrip('_')}")


def parse_grid(items: Iterable[str]) -> dict[str, list[Any]]:
    """["batch=1,16", "model=olmoe-1b-7b"] -> {"batch": [1, 16], "model": ["olmoe-1b-7b"]}."""
    grid: dict[str, list[Any]] = {}
    for item in items:
        key, sep, vals = item.partition("=")
        key = key.strip()
        if not sep or not vals.strip():
            raise ValueError(f"grid item {item!r}: expected KEY=V1,V2,... with KEY one of {', '.join(FACTORS)}")
        items = vals.split(",")
        if any(not v.strip() for v in items):
            raise ValueError(f"grid item {item!r}: an empty value; expected KEY=V1,V2,...")
        grid[key] = [convert(key, v) for v in items]
    return grid


def load_yaml(path: str | Path) -> dict[str, Any]:
    """A sweep file: {grid: {factor: [values]}, base: {factor: value}, note: str}; a mapping without a "grid"
    key is the grid itself."""
    try:
        import yaml
    except ImportError:
        raise ValueError("reading a YAML sweep file needs pyyaml (pip install pyyaml); use --grid instead") from None
    data = yaml.safe_load(Path(path).read_text())
    if not isinstance(data, dict):
        raise ValueError(f"{path}: a sweep file is a mapping with 'grid' (and optional 'base', 'note')")
    if "grid" not in data:
        data = {"grid": data}
    unknown = set(data) - {"grid", "base", "note"}
    if unknown:
        raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; allowed: grid, base, note")
    grid = {k: [convert(k, x) for x in (v if isinstance(v, list) else [v])] for k, v in data["grid"].items()}
    base = {k: convert(k, v) for k, v in (data.get("base") or {}).items()}
    return {"grid": grid, "base": base, "note": data.get("note", "")}


def load_design(path: str | Path) -> list[dict[str, Any]]:
    """The points of a design CSV (moelab doe design): the columns named like factors; others are ignored."""
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        raise ValueError(f"design {path} has no rows")
    cols = [c for c in rows[0] if c in FACTORS]
    if not cols:
        raise ValueError(f"design {path}: no column is a sweep factor ({', '.join(FACTORS)})")
    return [{c: convert(c, r[c]) for c in cols} for r in rows]


def expand(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """The Cartesian product of a grid, in the order given (the last factor varies fastest)."""
    for k, v in grid.items():
        if not v:
            raise ValueError(f"sweep factor {k} has no values")
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


def to_point(values: Mapping[str, Any], defaults: BenchConfig, wl_defaults: Workload
             ) -> tuple[BenchConfig, Workload]:
    """(engine config, workload) of one point: the factor values over the defaults."""
    cfg_kw: dict[str, Any] = {}
    overrides = dict(defaults.overrides)
    wl_kw: dict[str, Any] = {}
    for k, v in values.items():
        v = convert(k, v)
        where = FACTORS[k][1]
        if where == "config":
            cfg_kw[k] = v
        elif where == "shape":
            overrides[k] = v
        elif k == "len":
            wl_kw["input_len"] = wl_kw["output_len"] = v
        elif k == "workload":
            wl_kw["kind"] = v
        elif k == "prompts":
            wl_kw["path"] = v
            wl_kw.setdefault("kind", "file")
        else:
            wl_kw[k] = v
    if wl_kw.get("range_ratio", 0) > 0 and "kind" not in wl_kw and wl_defaults.kind == "fixed":
        wl_kw["kind"] = "random"  # as the CLI: a range ratio asks for random lengths
    valid = {f.name for f in fields(BenchConfig)}
    assert set(cfg_kw) <= valid, cfg_kw
    cfg = replace(defaults, overrides=overrides, **cfg_kw)
    return cfg, replace(wl_defaults, **wl_kw)


def plan(points: list[dict[str, Any]], defaults: BenchConfig, wl_defaults: Workload
         ) -> list[tuple[BenchConfig, Workload]]:
    return [to_point(p, defaults, wl_defaults) for p in points]


def run_sweep(store: ResultsStore, pairs: list[tuple[BenchConfig, Workload]], cal_for: Callable[[str], dict],
              opts: BenchOptions, resume: bool = False, study: str | None = None, note: str = "",
              fail_fast: bool = False, plain: bool = False) -> dict[str, Any]:
    """Measure every (config, workload) pair, one stored run each; returns {"sweep", "ran", "skipped",
    "status": {run_id: status}}. cal_for(device) gives the calibration of a resolved device."""
    from moelab.lab.progress import ProgressBar

    kind = "bench" if set(opts.modes) == {"throughput", "latency"} else opts.modes[0]
    sweep_id = uuid.uuid4().hex[:8]
    keyed = [(cfg, wl, point_key(cfg.to_dict(), workload_dict(wl, study))) for cfg, wl in pairs]
    todo = [(c, w, k) for c, w, k in keyed if not (resume and store.has_point(kind, k))]
    if resume:
        _close_interrupted(store, kind, {k for _, _, k in todo})
    groups: dict[tuple, list] = {}
    for c, w, k in todo:
        groups.setdefault(c.engine_key(), []).append((c, w, k))
    status: dict[str, str] = {}
    with ProgressBar(len(todo), f"sweep {sweep_id}", plain=plain) as bar:
        if len(todo) < len(keyed):
            bar.log(f"resume: {len(keyed) - len(todo)} of {len(keyed)} points already stored, {len(todo)} to run")
        for members in groups.values():
            engine = _GroupEngine(members)
            for cfg, wl, key in members:
                def fn(cfg: BenchConfig = cfg, wl: Workload = wl, engine: _GroupEngine = engine) -> tuple:
                    llm = engine.get(cfg)
                    rows, extra = measure_point(llm, wl, cal_for(llm.engine.resolved.device), opts)
                    return rows, extra, engine_facts(llm)

                extra = {"sweep": sweep_id, "study": study, "note": note}
                run_id, st = record_point(store, kind, cfg, wl, fn, key, extra=extra, study=study)
                status[run_id] = st
                label = f"{cfg.model} b={wl.batch} in={wl.input_len} out={wl.output_len}: {st}"
                if st != "ok":
                    error = store.run(run_id)["error"]
                    bar.log(f"{label} ({error[:200]})")
                    if fail_fast:
                        raise PointFailed(f"point failed (--fail-fast): {label}: {error}")
                    engine.drop()  # rebuild after a failure: the engine may hold aborted requests
                bar.advance(label)
            engine.drop()
    return {"sweep": sweep_id, "kind": kind, "ran": len(todo), "skipped": len(keyed) - len(todo), "status": status}


class PointFailed(RuntimeError):
    """A point failed under fail_fast (its run is stored with status failed and its error)."""


class _GroupEngine:
    """The one engine of a group of points, built on first use for the group's longest and widest request.
    A build failure is remembered, so every point of the group is recorded with it without retrying."""

    def __init__(self, members: list) -> None:
        self.max_len = max(needed_len(w) for _, w, _ in members)
        self.max_batch = max(w.batch for _, w, _ in members)
        self.llm = None
        self.build_error: BaseException | None = None

    def get(self, cfg: BenchConfig):
        if self.build_error is not None:
            raise self.build_error
        if self.llm is None:
            try:
                self.llm = build_llm(cfg, self.max_len, self.max_batch)
            except Exception as err:
                self.build_error = err.with_traceback(None)  # keep no frames (and their tensors) alive
                raise
        return self.llm

    def drop(self) -> None:
        if self.llm is not None:
            self.llm = None
            free_memory()


def _close_interrupted(store: ResultsStore, kind: str, keys: set[str]) -> None:
    """Mark runs of the points about to be re-run that are still "running" (a killed sweep) as failed."""
    stale = store.runs(kind=kind, status="running")
    for rid in stale[stale["point_key"].isin(keys)]["run_id"] if not stale.empty else []:
        store.finish_run(rid, "failed", error="interrupted: still running when the sweep was resumed")
