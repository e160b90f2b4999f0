"""`moelab launch`: strategy parsing, each engine's command line, and whole launches of a stand-in server (a small
Python script that answers /health, /v1/models and streaming /v1/completions) - start, health, model check,
recorded command and version, benchmark, stop - plus the ways a launch fails."""

from __future__ import annotations

import json
import socket
import sys
from pathlib import Path

import pytest

from moelab.cli import main as moelab_main
from moelab.lab.launch import EPLBOptions, Strategy, build_command

STAND_IN = r'''
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

argv = sys.argv[1:]
if argv == ["--version"]:
    print("standin 1.2.3")
    sys.exit(0)
if os.environ.get("STANDIN_FAIL"):
    print("standin: cannot load the model", flush=True)
    sys.exit(3)
opt = lambda name: argv[argv.index(name) + 1]
with open(os.environ["STANDIN_ARGV"], "a") as f:
    f.write(json.dumps(argv) + "\n")
name = os.environ.get("STANDIN_MODEL") or opt("--served-model-name")
time.sleep(0.3)  # "loading weights"

class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def reply(self, status, body, ctype="application/json"):
        data = body.encode()
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        if self.path == "/health":
            self.reply(200, "{}")
        elif self.path == "/v1/models":
            self.reply(200, json.dumps({"object": "list", "data": [{"id": name, "object": "model"}]}))
        else:
            self.reply(404, "{}")

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        n = body.get("max_tokens", 16)
        events = [{"choices": [{"index": 0, "text": "x", "finish_reason": None}]} for _ in range(n)]
        events.append({"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": n, "total_tokens": 3 + n}})
        self.reply(200, "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n",
                   "text/event-stream")

ThreadingHTTPServer(("127.0.0.1", int(opt("--port"))), Handler).serve_forever()
'''


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def stand_in(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, Path]:
    script = tmp_path / "stand_in.py"
    script.write_text(STAND_IN)
    argv_log = tmp_path / "argv.jsonl"
    monkeypatch.setenv("STANDIN_ARGV", str(argv_log))
    return f"{sys.executable} {script}", argv_log


def test_strategy_parsing() -> None:
    assert Strategy.parse("tp", gpus=8) == Strategy(tp=8)
    assert Strategy.parse("ep", gpus=8) == Strategy(tp=8, ep=True)
    assert Strategy.parse("dp-ep", gpus=8, eplb=True) == Strategy(dp=8, ep=True, eplb=True)
    assert Strategy.parse("dp", gpus=4, eplb=True) == Strategy(dp=4)  # eplb only applies to ep strategies
    assert Strategy.parse("tp=2,dp=4,ep,eplb") == Strategy(2, 4, True, True)
    assert Strategy.parse("ep,tp=2").name == "tp2-dp1-ep" and Strategy(2, 4, True).gpus == 8
    for bad, msg in [("tp", "needs --gpus"), ("tp=x", "cannot read 'tp=x'"), ("pp=2", "cannot read"),
                     ("tp=2,eplb", "needs ep"), ("tp=0", ">= 1")]:
        with pytest.raises(ValueError, match=msg):
            Strategy.parse(bad)


def test_vllm_commands() -> None:
    cmd = build_command("vllm", "org/M", Strategy(tp=2, dp=4, ep=True, eplb=True), "0.0.0.0", 8001, "m",
                        EPLBOptions(2, 1000, 3000), ["--max-model-len", "4096"])
    assert cmd == ["vllm", "serve", "org/M", "--host", "0.0.0.0", "--port", "8001", "--served-model-name", "m",
                   "--tensor-parallel-size", "2", "--data-parallel-size", "4", "--enable-expert-parallel",
                   "--enable-eplb", "--eplb-config",
                   '{"num_redundant_experts": 2, "window_size": 1000, "step_interval": 3000}',
                   "--max-model-len", "4096"]
    assert "--enable-expert-parallel" not in build_command("vllm", "M", Strategy(tp=8), "h", 1, "m")


def test_sglang_commands() -> None:
    def flags(s: Strategy, eplb: EPLBOptions | None = None) -> list[str]:
        cmd = build_command("sglang", "M", s, "h", 1, "m", eplb or EPLBOptions())
        assert cmd[:5] == ["python3", "-m", "sglang.launch_server", "--model-path", "M"]
        return cmd[cmd.index("--tp-size"):]

    assert flags(Strategy(tp=8)) == ["--tp-size", "8"]
    assert flags(Strategy(tp=8, ep=True)) == ["--tp-size", "8", "--ep-size", "8"]
    assert flags(Strategy(dp=8, ep=True)) == ["--tp-size", "8", "--dp-size", "8", "--enable-dp-attention",
                                              "--ep-size", "8"]
    assert flags(Strategy(tp=2, dp=4, ep=True, eplb=True), EPLBOptions(32, None, 1000)) == [
        "--tp-size", "8", "--dp-size", "4", "--enable-dp-attention", "--ep-size", "8", "--enable-eplb",
        "--ep-num-redundant-experts", "32", "--eplb-rebalance-num-iterations", "1000"]
    with pytest.raises(ValueError, match="one GPU"):
        build_command("moelab", "M", Strategy(tp=2), "h", 1, "m")


def test_dry_run_prints_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert moelab_main(["launch", "vllm", "org/M", "--gpus", "8", "--strategy", "tp", "ep", "dp-ep", "tp=2,dp=4,ep",
                        "--eplb", "--num-redundant-experts", "16", "--dry-run"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert [ln for ln in out if ln.startswith("# ")] == ["# vllm tp8-dp1 (8 GPU)", "# vllm tp8-dp1-ep-eplb (8 GPU)",
                                                          "# vllm tp1-dp8-ep-eplb (8 GPU)",
                                                          "# vllm tp2-dp4-ep-eplb (8 GPU)"]
    assert out[1].startswith("vllm serve org/M ") and "--eplb-config '{\"num_redundant_experts\": 16}'" in out[3]
    assert len(json.loads(out[-1])["launches"]) == 4


def test_launch_sweep_with_a_stand_in(stand_in, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    exe, argv_log = stand_in
    db, port = tmp_path / "r.sqlite", free_port()
    assert moelab_main(["launch", "vllm", "org/M", "--served-model-name", "m", "--executable", exe, "--port",
                        str(port), "--strategy", "tp=1", "tp=2,dp=2,ep", "--store", str(db), "--log-dir",
                        str(tmp_path / "logs"), "--bench",
                        "--num-prompts 4 --concurrency 2 --input-len 3 --output-len 5 --num-warmups 0"]) == 0
    launches = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["launches"]
    started = [json.loads(line) for line in argv_log.read_text().splitlines()]
    assert started == [rec["command"][2:] for rec in launches]  # the exact recorded command was run
    assert "--enable-expert-parallel" in started[1] and started[1][started[1].index("--data-parallel-size") + 1] == "2"
    for rec in launches:
        assert rec["version"] == "standin 1.2.3" and rec["models"] == ["m"] and rec["startup_seconds"] > 0.2
        assert rec["exit_code"] is not None  # stopped
        (bench,) = rec["bench"]
        assert (bench["completed"], bench["total_output_tokens"], bench["strategy"]) == (4, 20, rec["strategy"])
    from moelab.lab.store import ResultsStore

    store = ResultsStore(db)
    runs = store.runs()
    assert sorted(runs["kind"]) == ["launch", "launch", "serve", "serve"] and set(runs["status"]) == {"ok"}
    rows = store.rows()
    assert (rows["metric"] == "startup_seconds").sum() == 2


@pytest.mark.parametrize("env,message", [({"STANDIN_MODEL": "other"}, "serves ['other'], not the requested 'm'"),
                                         ({"STANDIN_FAIL": "1"}, "exited with code 3")])
def test_launch_failures_are_reported_and_cleaned_up(stand_in, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str], env: dict,
                                                     message: str) -> None:
    exe, _ = stand_in
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(SystemExit) as exit_:
        moelab_main(["launch", "sglang", "org/M", "--served-model-name", "m", "--executable", exe, "--port",
                     str(free_port()), "--no-store", "--log-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and message in err, err
    if "STANDIN_FAIL" in env:
        assert "cannot load the model" in err  # the log tail
