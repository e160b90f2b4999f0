"""scripts/bench_moe_gpu.py --rounds: the timing rows of several rounds merged per cell (median round)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent.parent / "scripts" / "bench_moe_gpu.py"


def load_script():
    spec = importlib.util.spec_from_file_location("bench_moe_gpu", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def row(label: str, M: int, ms: float, rnd: int) -> dict:
    return dict(kind="time", label=label, shape="olmoe", M=M, ms=ms, speedup=1.0 / ms, round=rnd)


def test_median_rows_takes_each_cells_median_round() -> None:
    bench = load_script()
    rows = [dict(kind="check", ok=True)]
    for rnd, (a, b, c) in enumerate([(2.0, 5.0, 1.0), (1.0, 4.0, 1.0), (3.0, 6.0, 1.0)]):
        rows += [row("shipped", 1, a, rnd), row("heuristic", 1, b, rnd), row("shipped", 16, c, rnd)]
    merged = bench.median_rows(rows)
    assert merged[0] == dict(kind="check", ok=True)
    cells = {(r["label"], r["M"]): r for r in merged if r.get("kind") == "time"}
    assert len(cells) == 3
    assert cells[("shipped", 1)]["ms"] == 2.0 and cells[("shipped", 1)]["round"] == 0
    assert cells[("shipped", 1)]["speedup"] == 0.5  # the median round's own figures
    assert cells[("shipped", 1)]["rounds_ms"] == [2.0, 1.0, 3.0] and cells[("shipped", 1)]["spread_pct"] == 200.0
    assert cells[("heuristic", 1)]["ms"] == 5.0 and cells[("shipped", 16)]["spread_pct"] == 0.0
    even = bench.median_rows([row("shipped", 1, 3.0, 0), row("shipped", 1, 1.0, 1)])
    assert even[0]["ms"] == 1.0  # the lower middle: a measured row, not an average
    one = bench.median_rows([row("shipped", 1, 3.0, 0)])
    assert one == [row("shipped", 1, 3.0, 0)]  # one round: unchanged, no spread fields


def test_rounds_run_in_alternating_order_and_store_their_medians(tmp_path: Path, monkeypatch, capsys) -> None:
    """Two rounds over the tiny shapes (the layer timings stubbed: this is about the rounds' bookkeeping): every
    timing row tagged with its round, the second round in the reverse order (shapes, token counts,
    shipped/heuristic), the medians in the JSON, and the round count in the report with check rows first."""
    import json

    bench = load_script()
    clock = iter(range(1, 1000))

    def fake_time_cell(name, shape, M, w13, w2, inputs, cfg, label, ceilings, dev) -> dict:
        ms = float(next(clock))
        return dict(kind="time", label=label, shape=name, M=M, ms=ms, tflops=1.0, gbps=1.0, floor_ms=1.0,
                    pct_floor=100 / ms, ref_ms=None, speedup=None, graph_vs_eager_maxdiff=0.0)

    monkeypatch.setattr(bench, "time_cell", fake_time_cell)
    monkeypatch.setattr(bench, "check_shape", lambda name, *a: [dict(kind="check", ok=True, rel_err=1e-3)])
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr("sys.argv", ["bench_moe_gpu.py", "--dry", "--rounds", "2", "--ms", "1,5"])
    bench.main()
    assert "rounds: 2 per cell" in capsys.readouterr().out
    result = json.loads((tmp_path / "bench_moe.json").read_text())
    assert result["rows"][0]["kind"] == "check"
    timed = [r for r in result["rows"] if r["kind"] == "time"]
    order = [(r["round"], r["shape"], r["M"], r["label"]) for r in timed]
    first = [o[1:] for o in order if o[0] == 0]
    second = [o[1:] for o in order if o[0] == 1]
    assert len(first) == len(second) == 8 and second == first[::-1]
    assert first[:2] == [("tiny", 1, "shipped"), ("tiny", 1, "heuristic")]
    medians = {(m["shape"], m["M"], m["label"]): m for m in result["medians"]}
    assert set(medians) == set(first) and all(len(m["rounds_ms"]) == 2 for m in medians.values())
    assert medians[("tiny", 1, "shipped")]["ms"] == 1.0  # the lower of its two rounds (1 and 16)
    monkeypatch.setattr("sys.argv", ["bench_moe_gpu.py", "--dry", "--rounds", "2", "--tune"])
    with pytest.raises(SystemExit):
        bench.main()
    assert "--rounds must be" in capsys.readouterr().err
