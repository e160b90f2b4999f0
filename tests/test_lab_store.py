"""ResultsStore: transactions, resume semantics, filters, exports, telemetry and artifacts."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pandas as pd
import pytest

from moelab.lab.store import ResultsStore, flatten, point_key


def _store(tmp_path: Path) -> ResultsStore:
    return ResultsStore(tmp_path / "r.sqlite")


def test_default_path_follows_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MOELAB_STORE", str(tmp_path / "env.sqlite"))
    assert ResultsStore().path == tmp_path / "env.sqlite"
    monkeypatch.delenv("MOELAB_STORE")
    monkeypatch.chdir(tmp_path)
    assert ResultsStore().path == Path("moelab_results.sqlite")


def test_run_lifecycle_and_tidy_rows(tmp_path: Path) -> None:
    s = _store(tmp_path)
    cfg, wl = {"model": "m", "overrides": {"layers": 2}}, {"batch": 4, "input_len": 8}
    rid = s.start_run("bench", cfg, wl, extra={"note": "x"})
    assert not s.has_point("bench", {"config": cfg, "workload": wl})  # running is not done
    s.add(rid, [{"metric": "throughput", "value": 10.0, "unit": "tok/s", "floor": 40.0, "pct_of_floor": 25.0,
                 "trial": 0},
                {"metric": "ttft", "value": 0.5, "unit": "s", "stat": "p99", "trial": 0}])
    s.finish_run(rid, config={"resolved": {"dtype": "float32"}})
    assert s.has_point("bench", point_key(cfg, wl))
    assert not s.has_point("throughput", point_key(cfg, wl))  # kinds are separate
    df = s.rows()
    assert len(df) == 2 and set(df["metric"]) == {"throughput", "ttft"}
    r = df[df["metric"] == "throughput"].iloc[0]
    assert (r["value"], r["floor"], r["pct_of_floor"], r["unit"]) == (10.0, 40.0, 25.0, "tok/s")
    assert r["overrides.layers"] == 2 and r["batch"] == 4 and r["resolved.dtype"] == "float32"
    assert r["git_sha"] is None or len(r["git_sha"]) == 40
    assert len(s.rows(metric="ttft", stat="p99")) == 1 and s.rows(batch=[4, 5]).shape[0] == 2
    assert s.rows(nonexistent=1).empty
    run = s.run(rid)
    assert run["extra"] == {"note": "x"} and run["config"]["overrides.layers"] == 2 and run["status"] == "ok"


def test_failed_and_killed_runs(tmp_path: Path) -> None:
    s = _store(tmp_path)
    oom = s.start_run("bench", {"a": 1}, {})
    s.finish_run(oom, "oom", error="CUDA out of memory")
    failed = s.start_run("bench", {"a": 2}, {})
    s.finish_run(failed, "failed", error="boom")
    killed = s.start_run("bench", {"a": 3}, {})
    s.add(killed, [{"metric": "x", "value": 1.0, "unit": ""}])  # rows written, then the process died
    assert s.has_point("bench", point_key({"a": 1}, {}))  # oom is a result: not re-run
    assert not s.has_point("bench", point_key({"a": 2}, {}))  # failed is re-run
    assert not s.has_point("bench", point_key({"a": 3}, {}))  # killed is re-run
    assert s.rows().empty  # the killed run's rows are not results
    assert len(s.rows(status=None)) == 1
    assert set(s.runs()["status"]) == {"oom", "failed", "running"}


def test_add_is_one_transaction(tmp_path: Path) -> None:
    s = _store(tmp_path)
    rid = s.start_run("bench", {}, {})
    with pytest.raises(ValueError, match="row 1 .*value must be a number"):
        s.add(rid, [{"metric": "a", "value": 1.0, "unit": ""}, {"metric": "b", "value": "fast", "unit": ""}])
    with pytest.raises(ValueError, match="row 0 needs a non-empty string 'metric'"):
        s.add(rid, [{"value": 1.0}])
    assert len(s.rows(status=None)) == 0
    with sqlite3.connect(s.path) as con:  # nothing half-written
        assert con.execute("SELECT COUNT(*) FROM rows").fetchone()[0] == 0


def test_bad_input_names_the_value(tmp_path: Path) -> None:
    s = _store(tmp_path)
    rid = s.start_run("bench", {}, {})
    with pytest.raises(ValueError, match="status 'done'; allowed: ok, failed, oom"):
        s.finish_run(rid, "done")
    with pytest.raises(ValueError, match="no run 'nope'"):
        s.add("nope", [])
    with pytest.raises(ValueError, match="suffix must be .csv or .parquet"):
        s.export(tmp_path / "x.json")


def test_nan_is_stored_as_null(tmp_path: Path) -> None:
    s = _store(tmp_path)
    rid = s.start_run("bench", {}, {})
    s.add(rid, [{"metric": "a", "value": float("nan"), "unit": "", "floor": float("inf")}])
    s.finish_run(rid)
    r = s.rows().iloc[0]
    assert pd.isna(r["value"]) and pd.isna(r["floor"])


def test_exports_round_trip(tmp_path: Path) -> None:
    s = _store(tmp_path)
    for b in (1, 2):
        rid = s.start_run("bench", {"model": "m"}, {"batch": b})
        s.add(rid, [{"metric": "throughput", "value": 10.0 * b, "unit": "tok/s", "trial": 0},
                    {"metric": "ttft", "value": 0.1, "unit": "s", "stat": "median"}])
        s.finish_run(rid)
    csv = pd.read_csv(s.export(tmp_path / "rows.csv"))
    assert len(csv) == 4 and sorted(csv[csv.metric == "throughput"]["value"]) == [10.0, 20.0]
    pytest.importorskip("pyarrow")
    pq = pd.read_parquet(s.export(tmp_path / "rows.parquet"))
    assert len(pq) == 4 and set(pq["batch"]) == {1, 2}
    runs = pd.read_csv(s.export(tmp_path / "runs.csv", table="runs"))
    assert len(runs) == 2 and "config" in runs


def test_telemetry_and_artifacts(tmp_path: Path) -> None:
    s = _store(tmp_path)
    rid = s.start_run("profile", {}, {})
    assert s.add_telemetry(rid, [(0.0, "power", 300.0), (0.1, "power", 310.0)]) == 2
    s.add_artifact(rid, "trace.json.gz", b"\x1f\x8b data", "application/gzip")
    s.add_artifact(rid, "note.txt", "hello", "text/plain")
    assert list(s.telemetry(rid)["value"]) == [300.0, 310.0]
    assert s.artifact(rid, "trace.json.gz") == b"\x1f\x8b data" and s.artifact(rid, "note.txt") == b"hello"
    assert set(s.artifacts(rid)["name"]) == {"trace.json.gz", "note.txt"}


def test_flatten_and_point_key_are_canonical() -> None:
    assert flatten({"a": {"b": 1, "c": {"d": 2}}, "e": [1, 2]}) == {"a.b": 1, "a.c.d": 2, "e": [1, 2]}
    assert point_key({"b": 1, "a": 2}, {"x": 1}) == point_key({"a": 2, "b": 1}, {"x": 1})
    assert point_key({"a": 1}, {}) != point_key({"a": 2}, {})
