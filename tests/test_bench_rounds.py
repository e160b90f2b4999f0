"""scripts/bench_moe_gpu.py --rounds: the timing rows of several rounds merged per cell (median round)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

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
