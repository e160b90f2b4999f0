"""ResultsStore: every lab measurement in one SQLite file, one tidy row per measurement, with provenance.

Tables (stdlib sqlite3, WAL journal):

- ``runs``: one row per run (a benchmark point, a calibration, a profile). run_id, kind, started/finished
  time (UTC ISO 8601), status ("running" | "ok" | "failed" | "oom"), error, point_key, provenance (git sha
  and dirty flag of the moelab checkout, host, GPU name, driver, torch / triton / python / moelab versions),
  the flat config, the workload and any extra as JSON.
- ``rows``: one row per measurement: run_id, metric, value, unit, floor and pct_of_floor (NULL when the
  metric has none), and the point's own keys (trial, batch, percentile, ...) as JSON.
- ``telemetry``: samples taken during a run (t seconds since the run's sampler started, metric, value).
- ``artifacts``: named blobs stored with a run (a profiler trace, a breakdown table), text or bytes.

Durability: every call is its own transaction (``with connection:``), so a sweep killed at any moment keeps
every point whose ``add`` returned and never keeps half a point's rows. A run killed before ``finish_run``
stays "running"; ``rows()`` returns only finished runs by default, and ``has_point`` counts only "ok" and
"oom" runs, so ``--resume`` re-runs exactly the unfinished and failed points.

The point key of a run is the canonical JSON (sorted keys, no spaces) of ``{"config": ..., "workload": ...}``
unless the caller passes its own; ``point_key()`` computes it the same way for ``has_point``.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Iterable, Mapping
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from moelab.lab.provenance import provenance

DEFAULT_PATH = "moelab_results.sqlite"
ENV_VAR = "MOELAB_STORE"
STATUSES = ("running", "ok", "failed", "oom")
FINAL_STATUSES = ("ok", "failed", "oom")
DONE_STATUSES = ("ok", "oom")  # a point with one of these is not re-run by --resume
ROW_FIELDS = ("metric", "value", "unit", "floor", "pct_of_floor")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS runs (
    run_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    started_at TEXT NOT NULL,
    finished_at TEXT,
    status TEXT NOT NULL,
    error TEXT,
    point_key TEXT,
    git_sha TEXT,
    git_dirty INTEGER,
    host TEXT,
    gpu_name TEXT,
    driver TEXT,
    torch_version TEXT,
    triton_version TEXT,
    python_version TEXT,
    moelab_version TEXT,
    config_json TEXT NOT NULL,
    workload_json TEXT NOT NULL,
    extra_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_point ON runs(kind, point_key, status);
CREATE TABLE IF NOT EXISTS rows (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    metric TEXT NOT NULL,
    value REAL,
    unit TEXT,
    floor REAL,
    pct_of_floor REAL,
    point_json TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS rows_run ON rows(run_id);
CREATE TABLE IF NOT EXISTS telemetry (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    t REAL NOT NULL,
    metric TEXT NOT NULL,
    value REAL
);
CREATE INDEX IF NOT EXISTS telemetry_run ON telemetry(run_id);
CREATE TABLE IF NOT EXISTS artifacts (
    run_id TEXT NOT NULL REFERENCES runs(run_id),
    name TEXT NOT NULL,
    mime TEXT NOT NULL,
    data BLOB NOT NULL,
    PRIMARY KEY (run_id, name)
);
"""

RUN_COLUMNS = ("run_id", "kind", "started_at", "finished_at", "status", "error", "point_key", "git_sha", "git_dirty",
               "host", "gpu_name", "driver", "torch_version", "triton_version", "python_version", "moelab_version")


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds")


def _jsonable(v: Any) -> Any:
    """Values JSON can hold: tuples to lists, paths and other objects to str, NaN/inf to None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, (str, int, float, bool)) or v is None:
        return v
    if isinstance(v, Mapping):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if hasattr(v, "item") and callable(v.item):  # numpy / torch scalars
        try:
            return _jsonable(v.item())
        except (TypeError, ValueError):
            pass
    return str(v)


def canonical_json(obj: Any) -> str:
    return json.dumps(_jsonable(obj), sort_keys=True, separators=(",", ":"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}, "c": 2} -> {"a.b": 1, "c": 2}. Lists stay values."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = _jsonable(v)
    return out


def point_key(config: Mapping[str, Any], workload: Mapping[str, Any]) -> str:
    """The identity of a measured point: canonical JSON of its flat config and workload."""
    return canonical_json({"config": flatten(config), "workload": flatten(workload)})


def _check_row(i: int, row: Mapping[str, Any]) -> tuple:
    if "metric" not in row or not isinstance(row["metric"], str) or not row["metric"]:
        raise ValueError(f"row {i} needs a non-empty string 'metric', got {row.get('metric')!r}")
    if "value" not in row:
        raise ValueError(f"row {i} ({row['metric']}) needs a 'value'")
    vals = []
    for k in ("value", "floor", "pct_of_floor"):
        v = row.get(k)
        if v is not None:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ValueError(f"row {i} ({row['metric']}): {k} must be a number or None, got {v!r}") from None
            v = v if math.isfinite(v) else None
        vals.append(v)
    point = {k: v for k, v in row.items() if k not in ROW_FIELDS}
    return row["metric"], vals[0], row.get("unit"), vals[1], vals[2], canonical_json(point)


class ResultsStore:
    """The lab's results file. Cheap to construct; opens a connection per call, so threads and processes can
    share one file (SQLite serializes writers; a busy writer is waited for up to 30 s)."""

    def __init__(self, path: str | os.PathLike | None = None, must_exist: bool = False) -> None:
        """must_exist: for commands that only read (results, report, analyses), a missing file is an error
        (a mistyped path would otherwise create an empty store and report "no runs" over the real results)."""
        self.path = Path(path if path is not None else os.environ.get(ENV_VAR) or DEFAULT_PATH)
        if must_exist and not self.path.is_file():
            raise ValueError(f"no results store at {self.path} (give --store or ${ENV_VAR}; a command that runs "
                             f"something creates it)")
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            with self._connect() as con:
                con.executescript(_SCHEMA)
        except sqlite3.DatabaseError as err:
            raise ValueError(f"{self.path}: not a moelab results store ({err})") from None

    def __repr__(self) -> str:
        return f"ResultsStore({str(self.path)!r})"

    def _connect(self) -> sqlite3.Connection:
        con = sqlite3.connect(self.path, timeout=30.0)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("PRAGMA synchronous=NORMAL")
        con.execute("PRAGMA foreign_keys=ON")
        return con

    def _write(self, sql: str, params: Iterable | None = None, many: bool = False) -> int:
        con = self._connect()
        try:
            with con:  # one transaction: commit on success, roll back on any exception
                cur = con.executemany(sql, params) if many else con.execute(sql, params or ())
                return cur.rowcount
        finally:
            con.close()

    # --- runs -------------------------------------------------------------------------------------------
    def start_run(self, kind: str, config: Mapping[str, Any], workload: Mapping[str, Any],
                  extra: Mapping[str, Any] | None = None, point: str | None = None) -> str:
        """Record a new run (status "running") with its provenance; returns its id.

        config is flattened ("a.b" keys). point overrides the point key (default: point_key(config, workload)).
        """
        if not isinstance(kind, str) or not kind:
            raise ValueError(f"kind must be a non-empty string, got {kind!r}")
        if not isinstance(config, Mapping) or not isinstance(workload, Mapping):
            raise ValueError("config and workload must be dicts")
        run_id = f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:8]}"
        prov = provenance()
        rec = dict(run_id=run_id, kind=kind, started_at=now_iso(), status="running",
                   point_key=point if point is not None else point_key(config, workload), **prov,
                   config_json=canonical_json(flatten(config)), workload_json=canonical_json(flatten(workload)),
                   extra_json=canonical_json(dict(extra or {})))
        cols = ", ".join(rec)
        self._write(f"INSERT INTO runs ({cols}) VALUES ({', '.join('?' * len(rec))})", list(rec.values()))
        return run_id

    def _require_run(self, run_id: str) -> None:
        con = self._connect()
        try:
            if con.execute("SELECT 1 FROM runs WHERE run_id = ?", (run_id,)).fetchone() is None:
                raise ValueError(f"no run {run_id!r} in {self.path}")
        finally:
            con.close()

    def add(self, run_id: str, rows: list[Mapping[str, Any]]) -> int:
        """Append measurement rows to a run, all in one transaction; returns how many were written.

        Each row: metric (str), value (number or None), unit (str), optional floor and pct_of_floor; every
        other key is a point key (trial, batch, ...) stored as JSON. NaN and inf are stored as NULL.
        """
        self._require_run(run_id)
        recs = [(run_id, *_check_row(i, r)) for i, r in enumerate(rows)]
        if recs:
            self._write("INSERT INTO rows (run_id, metric, value, unit, floor, pct_of_floor, point_json) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?)", recs, many=True)
        return len(recs)

    def finish_run(self, run_id: str, status: str = "ok", error: str | None = None,
                   extra: Mapping[str, Any] | None = None, config: Mapping[str, Any] | None = None) -> None:
        """Close a run with status ok | failed | oom (and the error text). extra is merged into the run's extra;
        config (e.g. what "auto" resolved to) is flattened and merged into its config; the point key stays."""
        if status not in FINAL_STATUSES:
            raise ValueError(f"status {status!r}; allowed: {', '.join(FINAL_STATUSES)}")
        con = self._connect()
        try:
            with con:
                row = con.execute("SELECT extra_json, config_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if row is None:
                    raise ValueError(f"no run {run_id!r} in {self.path}")
                merged = {**json.loads(row[0]), **dict(extra or {})}
                cfg = {**json.loads(row[1]), **flatten(config or {})}
                con.execute("UPDATE runs SET status = ?, error = ?, finished_at = ?, extra_json = ?, config_json = ? "
                            "WHERE run_id = ?", (status, error, now_iso(), canonical_json(merged),
                                                 canonical_json(cfg), run_id))
        finally:
            con.close()

    def update_extra(self, run_id: str, extra: Mapping[str, Any]) -> None:
        """Merge keys into a run's extra JSON (e.g. a telemetry summary) without changing its status."""
        con = self._connect()
        try:
            with con:
                row = con.execute("SELECT extra_json FROM runs WHERE run_id = ?", (run_id,)).fetchone()
                if row is None:
                    raise ValueError(f"no run {run_id!r} in {self.path}")
                merged = {**json.loads(row[0]), **dict(extra)}
                con.execute("UPDATE runs SET extra_json = ? WHERE run_id = ?", (canonical_json(merged), run_id))
        finally:
            con.close()

    def has_point(self, kind: str, point: str | Mapping[str, Any]) -> bool:
        """True when a run of this kind and point key finished "ok" or "oom" (what --resume skips).

        point: the key string, or a dict {"config": ..., "workload": ...} keyed as point_key() does.
        """
        if not isinstance(point, str):
            point = point_key(point.get("config", {}), point.get("workload", {}))
        con = self._connect()
        try:
            q = "SELECT 1 FROM runs WHERE kind = ? AND point_key = ? AND status IN (?, ?) LIMIT 1"
            return con.execute(q, (kind, point, *DONE_STATUSES)).fetchone() is not None
        finally:
            con.close()

    def run(self, run_id: str) -> dict[str, Any]:
        """One run as a dict, config / workload / extra decoded."""
        df = self.runs(run_id=run_id)
        if df.empty:
            raise ValueError(f"no run {run_id!r} in {self.path}")
        return df.iloc[0].to_dict()

    def runs(self, kind: str | None = None, status: str | Iterable[str] | None = None,
             run_id: str | Iterable[str] | None = None):
        """All runs (optionally of one kind / status / id) as a DataFrame, oldest first; config, workload and
        extra decoded into dict columns."""
        import pandas as pd

        where, params = _where(kind=kind, status=status, run_id=run_id)
        con = self._connect()
        try:
            df = pd.read_sql_query(f"SELECT * FROM runs{where} ORDER BY started_at, rowid", con, params=params)
        finally:
            con.close()
        for col in ("config", "workload", "extra"):
            df[col] = [json.loads(s) for s in df.pop(f"{col}_json")]
        return df

    def rows(self, status: str | Iterable[str] | None = "ok", **filters: Any):
        """Measurement rows joined with their run, as a tidy DataFrame.

        Columns: id, run_id, kind, metric, value, unit, floor, pct_of_floor, the run's status and provenance,
        every point key, and every flat config / workload key not already a column (config keys as-is,
        workload keys as-is: they never collide in the lab's own runs; on a collision the point key wins).
        status: the run statuses to include (default "ok"; None: all). filters: column == value, or
        column in list when the value is a list/tuple/set; a filter on a column that no row has gives an
        empty frame.
        """
        import pandas as pd

        sql_filters = {k: filters.pop(k) for k in ("kind", "run_id", "metric") if k in filters}
        where, params = _where(prefix="r.", status=status, kind=sql_filters.get("kind"),
                               run_id=sql_filters.get("run_id"))
        if "metric" in sql_filters:
            w2, p2 = _where(prefix="m.", metric=sql_filters["metric"])
            where = f"{where} AND {w2[7:]}" if where else w2
            params += p2
        cols = ", ".join(f"r.{c}" for c in RUN_COLUMNS if c not in ("run_id",))
        q = (f"SELECT m.id, m.run_id, m.metric, m.value, m.unit, m.floor, m.pct_of_floor, m.point_json, {cols}, "
             f"r.config_json, r.workload_json FROM rows m JOIN runs r ON m.run_id = r.run_id{where} ORDER BY m.id")
        con = self._connect()
        try:
            raw = pd.read_sql_query(q, con, params=params)
        finally:
            con.close()
        if raw.empty:
            base = raw.drop(columns=["point_json", "config_json", "workload_json"])
            return _apply_filters(base, filters)
        expanded = []
        for pj, cj, wj in zip(raw["point_json"], raw["config_json"], raw["workload_json"]):
            d = {**json.loads(cj), **json.loads(wj), **json.loads(pj)}
            expanded.append(d)
        extra = pd.DataFrame(expanded, index=raw.index)
        extra = extra[[c for c in extra.columns if c not in raw.columns]]
        df = pd.concat([raw.drop(columns=["point_json", "config_json", "workload_json"]), extra], axis=1)
        return _apply_filters(df, filters)

    # --- telemetry and artifacts ----------------------------------------------------------------------
    def add_telemetry(self, run_id: str, samples: Iterable[tuple[float, str, float | None]]) -> int:
        """Store (t seconds, metric, value) samples of a run in one transaction."""
        self._require_run(run_id)
        recs = [(run_id, float(t), str(m), None if v is None else float(v)) for t, m, v in samples]
        if recs:
            self._write("INSERT INTO telemetry (run_id, t, metric, value) VALUES (?, ?, ?, ?)", recs, many=True)
        return len(recs)

    def telemetry(self, run_id: str | Iterable[str] | None = None):
        import pandas as pd

        where, params = _where(run_id=run_id)
        con = self._connect()
        try:
            return pd.read_sql_query(f"SELECT * FROM telemetry{where} ORDER BY run_id, t", con, params=params)
        finally:
            con.close()

    def add_artifact(self, run_id: str, name: str, data: str | bytes, mime: str = "application/octet-stream") -> None:
        """Store a named blob with a run (replacing one of the same name). str is stored UTF-8 encoded."""
        self._require_run(run_id)
        blob = data.encode() if isinstance(data, str) else bytes(data)
        self._write("INSERT OR REPLACE INTO artifacts (run_id, name, mime, data) VALUES (?, ?, ?, ?)",
                    (run_id, name, mime, blob))

    def artifact(self, run_id: str, name: str) -> bytes:
        con = self._connect()
        try:
            row = con.execute("SELECT data FROM artifacts WHERE run_id = ? AND name = ?", (run_id, name)).fetchone()
        finally:
            con.close()
        if row is None:
            raise ValueError(f"run {run_id!r} has no artifact {name!r}")
        return bytes(row[0])

    def artifacts(self, run_id: str | None = None):
        """(run_id, name, mime, size) of the stored artifacts, without their data."""
        import pandas as pd

        where, params = _where(run_id=run_id)
        con = self._connect()
        try:
            return pd.read_sql_query(f"SELECT run_id, name, mime, length(data) AS size FROM artifacts{where} "
                                     "ORDER BY run_id, name", con, params=params)
        finally:
            con.close()

    # --- export ---------------------------------------------------------------------------------------
    def export(self, path: str | os.PathLike, table: str = "rows", status: str | None = "ok") -> Path:
        """Write rows (or runs / telemetry) to .csv or .parquet (the format follows the suffix; Parquet needs
        pyarrow). Dict columns of runs are written as JSON strings."""
        path = Path(path)
        if table == "rows":
            df = self.rows(status=status)
        elif table == "runs":
            df = self.runs()
            for col in ("config", "workload", "extra"):
                df[col] = [canonical_json(x) for x in df[col]]
        elif table == "telemetry":
            df = self.telemetry()
        else:
            raise ValueError(f"table {table!r}; allowed: rows, runs, telemetry")
        suffix = path.suffix.lower()
        if suffix == ".csv":
            df.to_csv(path, index=False)
        elif suffix in (".parquet", ".pq"):
            try:
                import pyarrow  # noqa: F401
            except ImportError:
                raise ValueError("Parquet export needs pyarrow (pip install pyarrow); use a .csv path") from None
            # mixed-type object columns (point keys can differ per metric) become strings for Parquet
            for col in [c for c in df.columns if df[c].dtype == "object"]:
                types = {type(v) for v in df[col] if v is not None and v == v}
                if len(types) > 1 or types - {str}:
                    df[col] = [None if v is None or v != v else (v if isinstance(v, str) else json.dumps(v))
                               for v in df[col]]
            df.to_parquet(path, index=False)
        else:
            raise ValueError(f"export path {str(path)!r}: suffix must be .csv or .parquet")
        return path


def _where(prefix: str = "", **filters: Any) -> tuple[str, list]:
    clauses, params = [], []
    for col, val in filters.items():
        if val is None:
            continue
        if isinstance(val, str):
            clauses.append(f"{prefix}{col} = ?")
            params.append(val)
        else:
            vals = list(val)
            clauses.append(f"{prefix}{col} IN ({', '.join('?' * len(vals))})")
            params.extend(vals)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _apply_filters(df, filters: Mapping[str, Any]):
    for col, val in filters.items():
        if col not in df.columns:
            return df.iloc[0:0]
        if isinstance(val, (list, tuple, set, frozenset)):
            df = df[df[col].isin(list(val))]
        else:
            df = df[df[col] == val]
    return df.reset_index(drop=True)
