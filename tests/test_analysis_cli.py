"""The analysis commands end to end on the CPU: analyze, placement, recommend, memory, predict, predictor."""

from __future__ import annotations

from pathlib import Path

import pytest
from matplotlib.figure import Figure

from moelab.analysis.figures import routing_figures
from moelab.analysis.placement import Placement
from moelab.analysis.synthetic import synthetic_trace
from moelab.analysis.trace import RoutingTrace
from moelab.cli import main


@pytest.fixture(scope="module")
def trace_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("trace") / "olmoe.npz"
    assert main(["analyze", "synthetic", "--preset", "olmoe-1b-7b", "--kind", "zipf:1.2", "--steps", "4",
                 "--tokens", "64", "--out", str(path)]) == 0
    return path


def test_analyze_routing_with_baseline_and_figures(trace_file: Path, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    t = RoutingTrace.load(trace_file)
    assert (t.model, t.source, t.num_layers, t.num_tokens) == ("olmoe-1b-7b", "synthetic-zipf", 16, 256)
    assert main(["analyze", "routing", str(trace_file), "--baseline", "uniform", "--figures", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "source synthetic-zipf" in out and "all layers" in out and "baseline uniform" in out
    assert {p.name for p in tmp_path.glob("*.png")} == {"tokens_per_expert.png", "step_imbalance.png",
                                                       "coactivation.png"}


def test_routing_figures_are_figures() -> None:
    figs = routing_figures(synthetic_trace("uniform", 8, 2, layers=2, steps=3, tokens_per_step=8, keep_ids=False))
    assert set(figs) == {"tokens_per_expert", "step_imbalance"} and all(isinstance(f, Figure) for f in figs.values())


def test_placement_command(trace_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "p.json"
    assert main(["placement", "--trace", str(trace_file), "--gpus", "8", "--strategy", "eplb", "--redundant", "8",
                 "--preset", "olmoe-1b-7b", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    assert "eplb" in text and "a2a MB/step" in text
    p = Placement.load(out)
    assert p.num_ranks == 8 and p.num_layers == 16 and p.num_replicas() == 72
    assert main(["placement", "--trace", str(trace_file), "--gpus", "8", "--strategy", "magic"]) == 2
    assert "allowed: contiguous" in capsys.readouterr().err


def test_recommend_and_memory(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--preset", "mixtral-8x7b", "--gpus", "2", "--gpu-memory", "80GB",
                 "--workload", "in=1024,out=256,batch=64", "--all"]) == 0
    out = capsys.readouterr().out
    assert "2 x 80 GB in 1 node(s)" in out and "TP2" in out and "does not fit" in out
    assert main(["recommend", "--preset", "deepseek-v3", "--gpus", "16", "--nodes", "2", "--dtype", "fp8"]) == 0
    assert "16 x 80 GB in 2 node(s)" in capsys.readouterr().out
    assert main(["memory", "--preset", "deepseek-v3", "--gpus", "16", "--layout", "dpa+ep:4", "--dtype", "fp8",
                 "--batch", "64", "--context", "4096"]) == 0
    out = capsys.readouterr().out
    assert "routed experts" in out and "fits: KV room" in out
    assert main(["recommend", "--preset", "mixtral-8x7b", "--gpus", "2", "--workload", "in=1"]) == 2
    assert "lacks batch" in capsys.readouterr().err
    # a layout the model cannot run is refused, not sized (EP16 with 8 experts, TP3 of 32 heads)
    assert main(["memory", "--preset", "mixtral-8x7b", "--gpus", "16", "--layout", "ep"]) == 2
    assert "exceeds the 8 experts" in capsys.readouterr().err
    assert main(["memory", "--preset", "mixtral-8x7b", "--gpus", "3", "--layout", "tp"]) == 2
    assert "does not divide 32 heads" in capsys.readouterr().err


def _store(path: Path) -> None:
    from moelab.lab.store import ResultsStore

    store = ResultsStore(path)
    for m in ("olmoe-1b-7b", "qwen3-30b-a3b", "deepseek-v2-lite"):
        for b in (1, 16, 64):
            run = store.start_run("throughput", {"model": m}, {"batch": b, "input_len": 128, "output_len": 128})
            floor = 100.0 * b
            store.add(run, [{"metric": "output_throughput", "value": floor * (0.3 + b / 128), "unit": "tok/s",
                             "floor": floor}])
            store.finish_run(run)


def test_predictor_fit_evaluate_predict(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db, model = tmp_path / "r.sqlite", tmp_path / "p.joblib"
    _store(db)
    assert main(["predictor", "evaluate", "--store", str(db)]) == 0
    out = capsys.readouterr().out
    assert "MAPE %" in out and "olmoe-1b-7b" in out and "all" in out
    assert main(["predictor", "fit", "--store", str(db), "--out", str(model)]) == 0
    assert "fitted output_throughput on 9 rows" in capsys.readouterr().out
    assert main(["predict", "--preset", "olmoe-1b-7b", "--batch", "16", "--input-len", "128", "--output-len", "128",
                 "--model-file", str(model)]) == 0
    out = capsys.readouterr().out
    assert "roofline output_throughput" in out and "learned:" in out and "ceilings it was fitted with" in out
    assert main(["predictor", "evaluate", "--store", str(db), "--by", "nosuchcol"]) == 2
    assert "not columns of the rows" in capsys.readouterr().err
