"""Predictor: the analytic roofline first, then a learned correction trained on stored results.

prediction = floor x exp(g(features)), where floor is the roofline value of the row's metric (the store's
`floor` column, in the metric's own unit: the speed at the limit for a throughput, the least time for a time)
and g a gradient-boosted regression of log(value / floor) on features of the model (ModelSpec) and the
workload. Evaluated leave-one-model-out and leave-one-batch-size-out: for each held-out group, fit on the rest
and report MAPE (mean |predicted - measured| / measured) and the worst case, next to two references: the bare
roofline (floor) and the roofline times the training rows' mean efficiency (a constant correction).

Input: a pandas DataFrame with the columns REQUIRED (one row per measurement; other columns are ignored):
model (a preset name, resolved with moelab.presets), batch, input_len, output_len, metric, value; and floor
when the rows have one (rows without are given the analytic floor of ANALYTIC_METRICS, else rejected);
"overrides.<name>" and top_k columns (EngineConfig's shape and experts-per-token overrides) change the spec.
"""

from __future__ import annotations

import functools
import hashlib
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from moelab.analysis.hardware import H100
from moelab.hf_config import apply_overrides, spec_from_hf_config
from moelab.presets import PRESETS, preset_config
from moelab.roofline import Ceilings, offline_run_floor
from moelab.spec import ModelSpec

REQUIRED = ("model", "batch", "input_len", "output_len", "metric", "value")
# metric -> what the analytic floor is, from offline_run_floor(spec, batch, input_len, output_len) seconds s
# (the lab's names, moelab.lab.metrics: throughput = (input + output) tokens / s, MoE-Inference-Bench's definition)
ANALYTIC_METRICS = {"output_throughput": "batch * output_len / s", "throughput": "batch * (in + out) / s",
                    "elapsed": "s"}
FEATURES = ("log2_experts", "top_k", "log2_hidden", "log2_expert_width", "moe_layers", "log10_active_params",
            "log10_total_params", "mla", "log2_kv_bytes", "log2_batch", "log2_input_len", "log2_output_len",
            "log2_pairs_per_expert", "touched_fraction")


@functools.lru_cache(maxsize=256)
def _spec_cached(model: str, overrides: tuple[tuple[str, Any], ...], top_k: int | None) -> ModelSpec:
    if model.lower() not in PRESETS:
        raise ValueError(f"model {model!r} is not a preset; the predictor resolves shapes from presets: "
                         f"{', '.join(PRESETS)}")
    spec = spec_from_hf_config(apply_overrides(preset_config(model), **dict(overrides)))
    return spec.replace(top_k=top_k) if top_k else spec


def row_spec(row: pd.Series) -> ModelSpec:
    """The ModelSpec of a row: its preset `model` with any "overrides.<name>" columns applied (the lab stores the
    EngineConfig's overrides dict flattened that way) and a `top_k` column (EngineConfig's experts-per-token
    override) when set."""
    ov = tuple(sorted((k.split(".", 1)[1], int(v)) for k, v in row.items()
                      if isinstance(k, str) and k.startswith("overrides.") and pd.notna(v)))
    k = row.get("top_k")
    return _spec_cached(str(row["model"]), ov, int(k) if k is not None and pd.notna(k) else None)


def check_frame(df: pd.DataFrame, metric: str | None = None) -> pd.DataFrame:
    """The rows of `metric` (or of the only metric present) with REQUIRED columns and a positive value."""
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(f"results lack columns {missing}; required: {', '.join(REQUIRED)} (+ floor)")
    metrics = sorted(df["metric"].dropna().unique())
    if metric is None:
        if len(metrics) != 1:
            raise ValueError(f"several metrics in the results; choose one of: {', '.join(metrics)}")
        metric = metrics[0]
    out = df[df["metric"] == metric].copy()
    if out.empty:
        raise ValueError(f"no rows of metric {metric!r}; available: {', '.join(metrics) or 'none'}")
    out = out[pd.to_numeric(out["value"], errors="coerce") > 0]
    if out.empty:
        raise ValueError(f"metric {metric!r} has no positive values")
    shape = out[["batch", "input_len", "output_len"]].apply(pd.to_numeric, errors="coerce")
    out = out[shape.notna().all(axis=1)]  # rows of other kinds (a serving run has no batch) are not points
    if out.empty:
        raise ValueError(f"metric {metric!r} has no rows with batch, input_len and output_len")
    for c in ("batch", "input_len", "output_len"):
        out[c] = pd.to_numeric(out[c]).astype(int)
    return out.reset_index(drop=True)


def analytic_floor(df: pd.DataFrame, ceilings: Ceilings = H100) -> pd.Series:
    """The row's `floor` where present and positive, else the roofline of ANALYTIC_METRICS (ValueError for other
    metrics)."""
    have = pd.to_numeric(df["floor"], errors="coerce") if "floor" in df.columns else pd.Series(np.nan, df.index)
    out = have.astype(float).copy()
    for i in df.index[~(have > 0)]:
        r = df.loc[i]
        if r["metric"] not in ANALYTIC_METRICS:
            raise ValueError(f"row {i} ({r['metric']}) has no floor and moelab has no analytic floor for that "
                             f"metric; known: {', '.join(ANALYTIC_METRICS)}")
        s = offline_run_floor(row_spec(r), int(r["batch"]), int(r["input_len"]), int(r["output_len"]),
                              ceilings).seconds
        if r["metric"] == "elapsed":
            out[i] = s
        elif r["metric"] == "output_throughput":
            out[i] = r["batch"] * r["output_len"] / s
        else:
            out[i] = r["batch"] * (r["input_len"] + r["output_len"]) / s
    return out


def features(df: pd.DataFrame) -> pd.DataFrame:
    """FEATURES of each row: shapes from the model's spec and the workload. The floor itself is not a feature, so
    a fitted correction carries over to floors computed with other ceilings."""
    rows = []
    for i in df.index:
        r = df.loc[i]
        s = row_spec(r)
        pc = s.param_counts()
        b = int(r["batch"])
        rows.append([math.log2(s.num_experts), s.top_k, math.log2(s.hidden_size), math.log2(s.moe_intermediate_size),
                     s.num_moe_layers, math.log10(pc.active), math.log10(pc.total), float(s.attention == "mla"),
                     math.log2(s.kv_bytes_per_token()), math.log2(b), math.log2(r["input_len"]),
                     math.log2(r["output_len"]), math.log2(b * s.top_k / s.num_experts),
                     1 - (1 - s.top_k / s.num_experts) ** b])
    return pd.DataFrame(rows, columns=list(FEATURES), index=df.index)


def data_hash(df: pd.DataFrame) -> str:
    """sha256 (first 16 hex) of the REQUIRED columns (+ floor) of the rows, sorted: the data version a model saw."""
    cols = [c for c in (*REQUIRED, "floor") if c in df.columns]
    text = df[cols].astype(str).sort_values(cols).to_csv(index=False)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _regressor() -> Any:
    from sklearn.ensemble import GradientBoostingRegressor

    return GradientBoostingRegressor(n_estimators=150, max_depth=3, learning_rate=0.1, subsample=0.8,
                                     min_samples_leaf=2, random_state=0)


@dataclass
class Predictor:
    """A fitted correction: predict(rows) = floor x exp(model(features))."""

    metric: str
    model: Any
    data_hash: str
    n_rows: int
    models_seen: list[str] = field(default_factory=list)
    batches_seen: list[int] = field(default_factory=list)
    ceilings: Ceilings = H100

    def predict(self, df: pd.DataFrame) -> pd.Series:
        rows = df.copy()
        rows["metric"] = self.metric
        floor = analytic_floor(rows, self.ceilings)
        return floor * np.exp(self.model.predict(features(rows).to_numpy()))

    def save(self, path: str | Path) -> Path:
        import joblib

        path = Path(path)
        joblib.dump({"format": "moelab-predictor", "version": 1, **self.__dict__}, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> Predictor:
        import joblib

        d = joblib.load(path)
        if not isinstance(d, dict) or d.get("format") != "moelab-predictor":
            raise ValueError(f"{path} is not a moelab predictor file")
        return cls(**{k: v for k, v in d.items() if k not in ("format", "version")})


def fit(df: pd.DataFrame, metric: str | None = None, ceilings: Ceilings = H100) -> Predictor:
    """Fit the correction on every row of `metric` (see check_frame)."""
    rows = check_frame(df, metric)
    floor = analytic_floor(rows, ceilings)
    y = np.log(rows["value"].astype(float) / floor)
    model = _regressor().fit(features(rows).to_numpy(), y.to_numpy())
    return Predictor(str(rows["metric"].iloc[0]), model, data_hash(rows), len(rows),
                     sorted(map(str, rows["model"].unique())), sorted(map(int, rows["batch"].unique())), ceilings)


def _ape(pred: np.ndarray, actual: np.ndarray) -> np.ndarray:
    return np.abs(pred - actual) / actual


def evaluate(df: pd.DataFrame, metric: str | None = None, by: Iterable[str] = ("model", "batch"),
             ceilings: Ceilings = H100) -> pd.DataFrame:
    """Leave-one-group-out for each column in `by`: one row per held-out group and one "all" row per column with
    the MAPE (%) and worst absolute percentage error of the learned predictor, the bare roofline and the roofline x
    constant efficiency, each fitted without the held-out group. A column with a single group is skipped."""
    rows = check_frame(df, metric)
    by = list(by)
    unknown = [c for c in by if c not in rows.columns]
    if unknown:
        raise ValueError(f"--by {unknown}: not columns of the rows; e.g. model, batch, input_len, output_len")
    floor = analytic_floor(rows, ceilings)
    X = features(rows).to_numpy()
    y = np.log(rows["value"].astype(float).to_numpy() / floor.to_numpy())
    actual = rows["value"].astype(float).to_numpy()
    out = []
    for col in by:
        groups = rows[col].astype(str).to_numpy()
        order = [str(v) for v in sorted(rows[col].unique())]
        if len(order) < 2:
            continue
        learned, const = np.empty(len(rows)), np.empty(len(rows))
        for g in order:
            test = groups == g
            model = _regressor().fit(X[~test], y[~test])
            learned[test] = floor.to_numpy()[test] * np.exp(model.predict(X[test]))
            const[test] = floor.to_numpy()[test] * math.exp(y[~test].mean())
        for g in [*order, "all"]:
            m = np.ones(len(rows), bool) if g == "all" else groups == g
            a_l, a_c, a_r = (_ape(p[m], actual[m]) for p in (learned, const, floor.to_numpy()))
            out.append({"left out": f"{col}", "group": g, "rows": int(m.sum()),
                        "MAPE %": 100 * a_l.mean(), "worst %": 100 * a_l.max(),
                        "roofline x const MAPE %": 100 * a_c.mean(), "roofline MAPE %": 100 * a_r.mean()})
    if not out:
        raise ValueError(f"leave-one-out needs at least two groups in one of {list(by)}")
    return pd.DataFrame(out)
