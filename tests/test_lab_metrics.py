"""Metric formulas against hand-computed values; workloads; floors; calibration; telemetry without a GPU."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest

from moelab.lab.floors import prefill_steps, run_floors
from moelab.lab.metrics import RequestTimes, latency_stats, spread, summarize, throughput
from moelab.lab.workload import Workload, draw_lengths, length_range, make_requests
from moelab.presets import preset_spec
from moelab.roofline import Ceilings, offline_run_floor


def test_summarize_by_hand() -> None:
    s = summarize([1.0, 2.0, 3.0, 4.0, 10.0])
    assert s["mean"] == 4.0 and s["median"] == 3.0 and s["min"] == 1.0 and s["max"] == 10.0
    # linear interpolation: p90 at rank 0.9 * 4 = 3.6 -> 4 + 0.6 * (10 - 4) = 7.6
    assert s["p90"] == pytest.approx(7.6) and s["p99"] == pytest.approx(4 + 0.96 * 6)
    assert s["std"] == pytest.approx(math.sqrt(((1 - 4) ** 2 + 4 + 1 + 0 + 36) / 5))
    assert all(math.isnan(v) for v in summarize([]).values())


def test_request_times_by_hand() -> None:
    r = RequestTimes(arrival=10.0, first_token=10.5, token_times=[10.5, 10.7, 11.0, 11.1], finished=11.1,
                     num_input=8, num_output=4)
    assert r.ttft == pytest.approx(0.5) and r.e2e == pytest.approx(1.1)
    assert r.itl == pytest.approx([0.2, 0.3, 0.1])
    assert r.tpot == pytest.approx((1.1 - 0.5) / 3)  # (E2E - TTFT) / (n - 1)
    one = RequestTimes(0.0, 0.2, [0.2], 0.2, 8, 1)
    assert one.tpot is None and one.itl == []
    st = latency_stats([r, one])
    assert st["ttft"]["mean"] == pytest.approx(0.35) and st["tpot"]["mean"] == pytest.approx(0.2)
    assert st["itl"]["median"] == pytest.approx(0.2)  # pooled gaps [0.2, 0.3, 0.1]


def test_throughput_is_the_papers_formula() -> None:
    t = throughput([128] * 16, [128] * 16, wall=2.0)
    assert t["throughput"] == 16 * (128 + 128) / 2.0  # batch x (input + output) / E2E
    assert t["output_throughput"] == 16 * 128 / 2.0 and t["request_throughput"] == 8.0
    with pytest.raises(ValueError, match="wall time must be > 0"):
        throughput([1], [1], 0.0)


def test_spread() -> None:
    s = spread([10.0, 12.0, 14.0])
    assert s["mean"] == 12.0 and s["std"] == pytest.approx(2.0) and s["cv"] == pytest.approx(2 / 12)
    assert spread([5.0])["std"] == 0.0


def test_random_lengths_follow_vllms_range_rule() -> None:
    assert length_range(100, 0.25) == (75, 125) and length_range(3, 0.9) == (1, 6)
    rng = np.random.default_rng(0)
    got = draw_lengths(100, 2000, 0.25, rng)
    assert min(got) == 75 and max(got) == 125
    assert draw_lengths(64, 3, 0.0, rng) == [64, 64, 64]


def test_workloads_are_deterministic_and_validated(tmp_path: Path) -> None:
    wl = Workload(batch=4, input_len=16, output_len=8, kind="random", range_ratio=0.5, seed=3)
    a, b = make_requests(wl, 512, eos_token_id=7), make_requests(wl, 512, eos_token_id=7)
    assert a == b
    prompts, outs = a
    assert all(8 <= len(p) <= 24 for p in prompts) and all(4 <= n <= 12 for n in outs)
    assert all(3 <= t < 512 and t != 7 for p in prompts for t in p)
    fixed = make_requests(Workload(batch=2, input_len=5, output_len=3), 100)
    assert [len(p) for p in fixed[0]] == [5, 5] and fixed[1] == [3, 3]
    with pytest.raises(ValueError, match="range_ratio must be in \\[0, 1\\), got 1.5"):
        Workload(range_ratio=1.5)
    with pytest.raises(ValueError, match="workload kind 'zipf'; allowed: fixed, random, file"):
        Workload(kind="zipf")
    with pytest.raises(ValueError, match="does not exist"):
        Workload(kind="file", path=str(tmp_path / "none.txt"))
    # a setting the kind would drop is refused, so what is stored is what was measured
    with pytest.raises(ValueError, match="fixed workload has exact lengths"):
        Workload(kind="fixed", range_ratio=0.5)
    (tmp_path / "p.txt").write_text("a prompt\n")
    with pytest.raises(ValueError, match="need the file kind, not 'random'"):
        Workload(kind="random", path=str(tmp_path / "p.txt"))


def test_file_workload_cycles_lines(tmp_path: Path) -> None:
    f = tmp_path / "p.txt"
    f.write_text("hello world\n\nsecond prompt\n")

    class Tok:
        def encode(self, s: str, add_special_tokens: bool = False):
            return type("E", (), {"ids": [ord(c) % 50 + 3 for c in s]})()

    prompts, outs = make_requests(Workload(batch=3, output_len=4, kind="file", path=str(f)), 100, tokenizer=Tok(),
                                  max_model_len=8)
    assert len(prompts) == 3 and prompts[0] == prompts[2] and all(len(p) <= 8 - 4 - 1 for p in prompts)


def test_prefill_chunking() -> None:
    steps = prefill_steps([5, 7, 3], budget=8)
    assert [s[0] for s in steps] == [[5, 3], [4, 3]]  # prompt 2 split 3 + 4
    assert [s[1] for s in steps] == [[5, 3], [7, 3]] and [s[2] for s in steps] == [1, 2]


def test_run_floor_matches_roofline_offline_floor() -> None:
    spec, c = preset_spec("olmoe-1b-7b"), Ceilings(3e12, 8e14)
    f = run_floors(spec, [128] * 64, [128] * 64, c)
    ref = offline_run_floor(spec, 64, 128, 128, c)
    assert f.total.seconds == pytest.approx(ref.seconds, rel=1e-12) and f.decode_steps == 127
    assert f.decode_step_seconds == pytest.approx(f.decode.seconds / 127)
    short = run_floors(spec, [128] * 4, [1, 1, 3, 2], c)  # requests leave the decode batch as they finish
    assert short.decode_steps == 2 and short.decode.seconds < f.decode.seconds


def test_ttft_floor_is_per_rank() -> None:
    """The k-th smallest TTFT is bounded by the prefill of the k shortest prompts alone: the first request can
    have its token after one prompt's prefill, the last only after all of them. An engine at the floor would show
    100 % for every statistic, never more."""
    spec, c = preset_spec("olmoe-1b-7b"), Ceilings(3e12, 8e14)
    lens = [2048] * 16
    f = run_floors(spec, lens, [4] * 16, c, max_num_batched_tokens=8192)
    one = run_floors(spec, [2048], [4], c).prefill.seconds
    assert f.ttft[0] == pytest.approx(one) and f.ttft[-1] == pytest.approx(f.prefill.seconds)
    assert all(a <= b for a, b in zip(f.ttft, f.ttft[1:])) and f.ttft[7] < f.prefill.seconds / 1.5
    mixed = run_floors(spec, [900, 30, 400], [2, 2, 2], c, max_num_batched_tokens=512)
    assert mixed.ttft[0] == pytest.approx(run_floors(spec, [30], [2], c, max_num_batched_tokens=512).prefill.seconds)
    from moelab.lab.bench import latency_floors
    from moelab.lab.metrics import summarize

    fl = latency_floors(f)
    at_floor = summarize(f.ttft)  # TTFTs exactly at their floors: 100 % for every statistic
    assert all(fl["ttft"][k] == pytest.approx(at_floor[k]) for k in fl["ttft"])


def test_calibration_on_cpu_labels_what_it_skips(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from moelab.lab.calibrate import ceilings, get_calibration, measure, record
    from moelab.lab.store import ResultsStore

    monkeypatch.setenv("MOELAB_CACHE", str(tmp_path / "cache"))
    cal = measure("cpu", iters=2, quick=True)
    assert set(cal["values"]) == {"copy_bandwidth", "matmul_bf16", "matmul_fp32"}
    assert all(v > 0 for v in cal["values"].values())
    assert set(cal["skipped"]) == {"matmul_fp8", "h2d_bandwidth"} and cal["device_key"].startswith("cpu:")
    store = ResultsStore(tmp_path / "r.sqlite")
    rid = record(store, cal)
    assert (tmp_path / "cache" / "calibration.json").is_file()
    again = get_calibration(store, "cpu")  # the stored one, not a new measurement
    assert again["run_id"] == rid and len(store.runs(kind="calibrate")) == 1
    c = ceilings(again, "float32")
    assert c.matmul == cal["values"]["matmul_fp32"] and c.bandwidth == cal["values"]["copy_bandwidth"]
    with pytest.raises(ValueError, match="dtype 'int4'; allowed"):
        ceilings(again, "int4")
    # another store: the cached calibration is recorded there (a run cites a calibration its store holds)
    other = ResultsStore(tmp_path / "other.sqlite")
    copied = get_calibration(other, "cpu")
    runs = other.runs(kind="calibrate")
    assert len(runs) == 1 and copied["run_id"] == runs.iloc[0]["run_id"] != rid
    assert copied["values"] == cal["values"] and copied["measured_at"] == cal["measured_at"]


def test_telemetry_without_gpu_says_why() -> None:
    from moelab.lab.telemetry import TelemetrySampler

    with TelemetrySampler(interval=0.01, enabled=False) as tel:
        pass
    assert tel.samples == [] and tel.summary()["reason"] == "disabled"
    with pytest.raises(ValueError, match="interval must be > 0"):
        TelemetrySampler(interval=0)
