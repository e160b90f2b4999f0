"""Sweeps on the tiny CPU model: grids, studies, benchmark rows against their formulas, OOM kept, kill and resume."""

from __future__ import annotations

from pathlib import Path

import pytest

from moelab.lab import sweep as sweep_mod
from moelab.lab.bench import BenchConfig, BenchOptions, build_llm, measure_point
from moelab.lab.calibrate import measure
from moelab.lab.store import ResultsStore
from moelab.lab.sweep import STUDIES, TINY, expand, load_design, load_yaml, parse_grid, plan, run_sweep
from moelab.lab.workload import Workload

FAST = BenchOptions(trials=1, warmup=0, telemetry=False)


@pytest.fixture(scope="module")
def cal() -> dict:
    c = measure("cpu", iters=2, quick=True)
    c["run_id"] = None
    return c


def _pairs(grid: dict) -> list:
    return plan([{**TINY, **p} for p in expand(grid)], BenchConfig(), Workload())


def test_grid_parsing_and_errors(tmp_path: Path) -> None:
    assert parse_grid(["batch=1,16", "model=olmoe-1b-7b", "enforce_eager=true"]) == \
        {"batch": [1, 16], "model": ["olmoe-1b-7b"], "enforce_eager": [True]}
    with pytest.raises(ValueError, match="unknown sweep factor 'batchsize'; allowed: model"):
        parse_grid(["batchsize=1"])
    with pytest.raises(ValueError, match="sweep factor batch: 'x' is not a valid int"):
        parse_grid(["batch=1,x"])
    with pytest.raises(ValueError, match="expected KEY=V1,V2"):
        parse_grid(["batch"])
    f = tmp_path / "s.yaml"
    f.write_text("base: {model: olmoe-1b-7b, layers: 2}\ngrid: {batch: [1, 2], len: 64}\nnote: hi\n")
    y = load_yaml(f)
    assert y["grid"] == {"batch": [1, 2], "len": [64]} and y["base"]["layers"] == 2 and y["note"] == "hi"
    d = tmp_path / "d.csv"
    d.write_text("run,run_order,batch,len,batch_coded\n1,1,1,16,-1\n2,2,4,32,1\n")
    assert load_design(d) == [{"batch": 1, "len": 16}, {"batch": 4, "len": 32}]


def test_builtin_studies() -> None:
    grid = _plan_study("mib-grid")
    assert len(grid) == 25 and {w.input_len for _, w in grid} == {128, 256, 512, 1024, 2048}
    assert all(w.input_len == w.output_len for _, w in grid) and {w.batch for _, w in grid} == {1, 16, 32, 64, 128}
    hp = _plan_study("mib-hparams")
    assert len(hp) == 64 and all(c.model == "mixtral-8x7b" and c.overrides["layers"] == 2 for c, _ in hp)
    assert {c.overrides["moe_intermediate_size"] for c, _ in hp} == {1792, 3584, 7168, 14336}
    assert {c.top_k for c, _ in hp} == {1, 2, 4, 8} and all((w.batch, w.input_len) == (16, 2048) for _, w in hp)


def _plan_study(name: str) -> list:
    s = STUDIES[name]
    return plan([{**s["base"], **p} for p in expand(s["grid"])], BenchConfig(), Workload())


def test_point_rows_follow_their_formulas(cal: dict) -> None:
    llm = build_llm(BenchConfig(**{k: v for k, v in TINY.items() if k in ("model", "device")},
                                overrides={k: v for k, v in TINY.items() if k not in ("model", "device")}), 64, 4)
    wl = Workload(batch=3, input_len=12, output_len=5)
    rows, extra = measure_point(llm, wl, cal, BenchOptions(trials=2, warmup=1, telemetry=False))
    by = lambda m, **kw: [r for r in rows if r["metric"] == m and all(r.get(k) == v for k, v in kw.items())]  # noqa
    for trial in (0, 1):
        (el,) = by("elapsed", trial=trial)
        (tp,) = by("throughput", trial=trial)
        (out,) = by("output_throughput", trial=trial)
        assert tp["value"] == pytest.approx(3 * (12 + 5) / el["value"])  # batch x (in + out) / E2E
        assert out["value"] == pytest.approx(3 * 5 / el["value"])
        assert el["pct_of_floor"] == pytest.approx(100 * el["floor"] / el["value"])
        assert tp["floor"] == pytest.approx(3 * 17 / el["floor"]) and tp["pct_of_floor"] == el["pct_of_floor"]
        assert len(by("ttft", trial=trial)) == 7 and len(by("ttft_oneshot", trial=trial)) == 1
        (itl,) = by("itl", trial=trial, stat="mean")
        assert itl["floor"] == pytest.approx(extra["floor"]["decode_s"] / 4)  # 4 decode steps
        # floors only for the statistics they bound: the mean decode step is no floor of a median gap, the run
        # no floor of a median E2E; TTFT has one per statistic, none above the whole prefill
        assert by("itl", trial=trial, stat="median")[0]["floor"] is None
        assert [r["stat"] for r in by("e2e", trial=trial) if r["floor"] is not None] == ["max"]
        ttft = {r["stat"]: r["floor"] for r in by("ttft", trial=trial)}
        assert ttft["std"] is None and ttft["min"] <= ttft["median"] <= ttft["max"]
        assert ttft["max"] == pytest.approx(extra["floor"]["prefill_s"])
    assert by("num_preemptions")[0]["value"] == 0
    assert extra["telemetry"]["reason"] == "CPU run: no GPU to sample"
    assert extra["tokens"] == {"input": 36, "output": 15} and extra["floor"]["routing"] == "uniform"


def test_floors_from_the_observed_routing(cal: dict) -> None:
    shape = {k: v for k, v in TINY.items() if k not in ("model", "device")}
    llm = build_llm(BenchConfig(model="olmoe-1b-7b", device="cpu", overrides=shape, record_routing=True), 64, 4)
    rows, extra = measure_point(llm, Workload(batch=2, input_len=6, output_len=4), cal, FAST)
    assert extra["floor"]["routing"] == "observed"
    (touched,) = [r["value"] for r in rows if r["metric"] == "touched_experts"]
    assert 2 <= touched <= 8  # top-2 of 8 experts: at least 2 distinct per step, at most all
    spec = llm.engine.spec
    from moelab.lab.calibrate import ceilings
    from moelab.lab.floors import run_floors
    c = ceilings(cal, "float32")
    every = run_floors(spec, [6, 6], [4, 4], c, touched_for=lambda T: [8.0] * spec.num_moe_layers)
    assert every.total.bytes > run_floors(spec, [6, 6], [4, 4], c).total.bytes


def test_sweep_killed_and_resumed_loses_and_duplicates_nothing(tmp_path: Path, cal: dict,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultsStore(tmp_path / "r.sqlite")
    pairs = _pairs({"batch": [1, 2], "len": [4, 6]})
    calls = {"n": 0}
    real = sweep_mod.measure_point

    def dies_on_third(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # the process is killed while the third point runs
        return real(*a, **k)

    monkeypatch.setattr(sweep_mod, "measure_point", dies_on_third)
    with pytest.raises(KeyboardInterrupt):
        run_sweep(store, pairs, lambda d: cal, FAST, plain=True)
    assert sorted(store.runs()["status"]) == ["ok", "ok", "running"]
    per_point = len(store.rows()) // 2
    monkeypatch.setattr(sweep_mod, "measure_point", real)
    res = run_sweep(store, pairs, lambda d: cal, FAST, resume=True, plain=True)
    assert (res["ran"], res["skipped"]) == (2, 2)
    ok = store.runs(status="ok")
    assert len(ok) == 4 and ok["point_key"].nunique() == 4  # one finished run per point
    assert store.runs(status="failed")["error"].str.startswith("interrupted").all()  # the killed run, closed
    rows = store.rows()
    assert len(rows) == 4 * per_point and not rows.duplicated(["point_key", "metric", "stat", "trial"]).any()
    again = run_sweep(store, pairs, lambda d: cal, FAST, resume=True, plain=True)
    assert again["ran"] == 0 and len(store.rows()) == 4 * per_point


def test_out_of_memory_points_are_kept(tmp_path: Path, cal: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    store = ResultsStore(tmp_path / "r.sqlite")
    real = sweep_mod.measure_point

    def oom_at_batch_2(llm, wl, *a, **k):
        if wl.batch == 2:
            raise RuntimeError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real(llm, wl, *a, **k)

    monkeypatch.setattr(sweep_mod, "measure_point", oom_at_batch_2)
    res = run_sweep(store, _pairs({"batch": [1, 2, 3], "len": [4]}), lambda d: cal, FAST, plain=True)
    assert sorted(res["status"].values()) == ["ok", "ok", "oom"]
    oom = store.runs(status="oom").iloc[0]
    assert "out of memory" in oom["error"] and oom["workload"]["batch"] == 2
    monkeypatch.setattr(sweep_mod, "measure_point", real)
    assert run_sweep(store, _pairs({"batch": [1, 2, 3], "len": [4]}), lambda d: cal, FAST, resume=True,
                     plain=True)["ran"] == 0  # an OOM point is a result, not re-run


def test_sweep_cli_dry_run(capsys: pytest.CaptureFixture[str]) -> None:
    from moelab.cli import main

    assert main(["bench", "sweep", "--study", "mib-hparams", "--grid", "len=256", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "64 points" in out and "in=256 out=256" in out
    assert main(["bench", "sweep", "--dry-run"]) == 2  # nothing to sweep: a clear error
    assert "nothing to sweep" in capsys.readouterr().err


def test_lab_cli_bad_input_is_refused_and_loses_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                                        ) -> None:
    """Read-only commands never create a store at a mistyped path (nor overwrite a report from it); bad flags
    are exit 2 with a message before any point runs; a point that fails is exit 1 (its error stored)."""
    from moelab.cli import main

    tiny = ["--model", "olmoe-1b-7b", "--device", "cpu", "--layers", "2", "--hidden-size", "128", "--heads", "4",
            "--kv-heads", "4", "--experts", "8", "--top-k", "2", "--moe-intermediate-size", "64", "--vocab-size",
            "512", "--batch", "1", "--input-len", "4", "--output-len", "2", "--trials", "1", "--warmup", "0",
            "--no-telemetry", "--plain"]
    typo = tmp_path / "typo.sqlite"
    report = tmp_path / "rep"
    report.mkdir()
    (report / "report.md").write_text("the real report")
    for argv in (["report", "--store", str(typo), "--out", str(report)], ["results", "--store", str(typo)],
                 ["doe", "analyze", "--store", str(typo), "--metric", "throughput", "--factors", "batch"]):
        assert main(argv) == 2, argv
        assert "no results store" in capsys.readouterr().err
    assert not typo.exists() and (report / "report.md").read_text() == "the real report"
    store = str(tmp_path / "s.sqlite")
    for bad, msg in ((["--device", "gpu0"], "gpu0"), (["--moe-backend", "fast"], "fast"),
                     (["--max-num-batched-tokens", "0"], "max_num_batched_tokens"),
                     (["--gpu-memory-utilization", "2"], "gpu_memory_utilization"),
                     (["--model", "nope"], "neither a checkpoint directory nor a preset"),
                     (["--workload", "fixed", "--range-ratio", "0.5"], "exact lengths")):
        assert main(["bench", "throughput", *tiny, *bad, "--store", store]) == 2, bad
        assert msg in capsys.readouterr().err, bad
    assert main(["bench", "sweep", *tiny, "--grid", "batch=1,,2", "--store", store]) == 2
    assert "empty value" in capsys.readouterr().err
    assert main(["bench", "sweep", *tiny, "--config", str(tmp_path / "none.yaml"), "--store", store]) == 2
    assert "none.yaml" in capsys.readouterr().err
    assert not Path(store).exists()  # nothing ran, nothing was stored
    empty = tmp_path / "empty-ckpt"
    empty.mkdir()
    assert main(["bench", "throughput", *tiny, "--model", str(empty), "--store", store]) == 1
    assert "1 point(s) failed" in capsys.readouterr().err
    assert ResultsStore(store).runs(status="failed").shape[0] == 1
    assert main(["results", "--store", store, "--table", "telemetry"]) == 0
    assert "no telemetry" in capsys.readouterr().out
