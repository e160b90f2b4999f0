"""moelab bench soak (reliability P4 / P6) against a live tiny moelab server: arrivals, hang-ups, the idle check at
the end, memory sampling and the slope fit; bad input and a dead server are clear errors."""

from __future__ import annotations

import json
import os

import pytest
from server_helpers import LiveServer, make_engine, wait_idle

from moelab.lab import soak


def test_soak_against_moelab_serve(capsys: pytest.CaptureFixture[str], tmp_path) -> None:
    srv = LiveServer(make_engine(max_num_seqs=4), served_model_names=["tiny"])
    try:
        code = soak.main(["--base-url", srv.url, "--duration", "2", "--rate", "40", "--hang-up", "0.3",
                          "--max-tokens", "16", "--max-words", "12", "--pid", str(os.getpid()), "--interval", "0.1",
                          "--idle-timeout", "30", "--result", str(tmp_path / "soak.json")])
        res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
        wait_idle(srv.state, srv.engine)
    finally:
        srv.stop()
    assert code == 0 and res["passed"], res
    assert res["requests"] == res["ok"] + res["hung_up"] + res["error"] and res["requests"] >= 40
    assert res["hung_up"] > 0 and res["error"] == 0 and res["idle_at_end"]
    assert res["final_gauges"] == {"num_requests_running": 0, "num_requests_waiting": 0, "kv_cache_usage_perc": 0}
    assert res["peak_waiting"] > 0 and res["rss_first_mb"] > 0 and res["rss_slope_mb_per_hour"] is not None
    assert json.loads((tmp_path / "soak.json").read_text())["requests"] == res["requests"]


def test_slope_and_gauges_and_bad_input(capsys: pytest.CaptureFixture[str]) -> None:
    flat = [{"t": t, "rss_mb": 100.0} for t in range(10)]
    growing = [{"t": t, "rss_mb": 100.0 + t / 36} for t in range(10)]  # 100 MB an hour
    assert soak.slope_mb_per_hour(flat, 0) == pytest.approx(0, abs=1e-6)
    assert soak.slope_mb_per_hour(growing, 2) == pytest.approx(100)
    assert soak.slope_mb_per_hour(growing[:2], 0) is None
    page = 'vllm:num_requests_running{model_name="m"} 3\nvllm:num_requests_waiting{model_name="m"} 0\n'
    assert soak.parse_gauges(page) == {"num_requests_running": 3, "num_requests_waiting": 0}
    assert soak.main(["--rate", "0"]) == 2 and "--rate must be > 0" in capsys.readouterr().err
    assert soak.main(["--pid", "999999999"]) == 2 and "no such process" in capsys.readouterr().err
    assert soak.main(["--base-url", "http://127.0.0.1:9", "--duration", "1"]) == 2
    assert "did not answer GET /v1/models" in capsys.readouterr().err
