"""`moelab bench serve`: the metric arithmetic on hand-made timelines, arrival schedules, workloads, and whole runs
against a fake OpenAI server (known delays, injected failures) and against `moelab serve`."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from server_helpers import MAX_MODEL_LEN, TINY, LiveServer, make_engine

from moelab.cli import main as moelab_main
from moelab.engine.config import EngineConfig
from moelab.engine.llm_engine import LLMEngine
from moelab.lab import serving
from moelab.lab.serving_metrics import RequestResult, arrival_times, parse_goodput, summarize
from moelab.lab.serving_report import format_report, store_rows
from moelab.server.serve import bind_socket

# ----- arithmetic -----


def test_summary_on_a_hand_made_timeline() -> None:
    # r1: sent at 0, chunks at 0.1, 0.3, 0.6, stream done at 0.6, 3 tokens (usage), 10 prompt tokens
    r1 = RequestResult(True, send_time=0.0, input_tokens=10, output_tokens=3, ttft=0.1, itl=[0.2, 0.3], e2el=0.6,
                       chunk_times=[0.1, 0.3, 0.6], tokens_from_usage=True)
    # r2: sent at 0.5, one chunk at 0.7, done at 0.7, 1 token, 20 prompt tokens
    r2 = RequestResult(True, send_time=0.5, input_tokens=20, output_tokens=1, ttft=0.2, e2el=0.2, chunk_times=[0.7],
                       tokens_from_usage=True)
    r3 = RequestResult(False, error="HTTP 500: boom", send_time=0.2)
    s = summarize([r1, r2, r3], duration=2.0, start=0.0, slos={"ttft": 150.0}, percentiles=[50, 99])
    assert (s["completed"], s["failed"], s["failed_reasons"]) == (2, 1, {"HTTP 500: boom": 1})
    assert (s["total_input_tokens"], s["total_output_tokens"]) == (30, 4)
    assert s["request_throughput"] == 1.0 and s["output_throughput"] == 2.0 and s["total_token_throughput"] == 17.0
    assert s["request_goodput"] == 0.5  # only r1 has TTFT <= 150 ms
    assert s["mean_ttft_ms"] == pytest.approx(150) and s["std_ttft_ms"] == pytest.approx(50)
    assert s["p99_ttft_ms"] == pytest.approx(100 + 0.99 * 100) and s["p50_ttft_ms"] == pytest.approx(150)
    assert s["mean_tpot_ms"] == pytest.approx((600 - 100) / 2)  # r1 only: (E2EL - TTFT) / (n - 1)
    assert s["mean_itl_ms"] == pytest.approx(250) and s["median_itl_ms"] == pytest.approx(250)
    assert s["mean_e2el_ms"] == pytest.approx(400)
    assert s["max_concurrent_requests"] == 2 and s["max_output_tokens_per_s"] == 4  # all chunks in second 0
    assert s["token_counts_from_usage"] is True
    tpot_slo = summarize([r1, r2], 1.0, 0.0, slos={"tpot": 200.0})
    assert tpot_slo["request_goodput"] == 1.0  # r1's TPOT 250 ms fails; r2 has one token: TPOT 0 passes


def test_summary_of_nothing() -> None:
    s = summarize([RequestResult(False, error="x")], 1.0, 0.0)
    # no sample: None (stored as nothing), not a 0 that reads as measured
    assert s["completed"] == 0 and s["mean_ttft_ms"] is None and s["request_goodput"] is None
    assert not [r for r in store_rows({**s, "request_rate": 1.0, "max_concurrency": None})
                if r["metric"].endswith("_ttft_ms")]
    assert "n/a (no sample)" in format_report({**s, "request_rate": "inf", "max_concurrency": None}, [90, 95, 99])
    with pytest.raises(ValueError, match="duration"):
        summarize([], 0.0, 0.0)


def test_arrival_schedules() -> None:
    assert arrival_times(5, math.inf) == [0.0] * 5
    assert arrival_times(5, 2.0, burstiness=math.inf) == pytest.approx([0, 0.5, 1.0, 1.5, 2.0])
    t = np.array(arrival_times(4001, 10.0, burstiness=1.0, seed=3))
    gaps = np.diff(t)
    assert t[0] == 0 and t[-1] == pytest.approx(400.0) and (gaps >= 0).all()
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.08)  # exponential gaps: CV 1
    gaps4 = np.diff(arrival_times(4001, 10.0, burstiness=4.0, seed=3))
    assert gaps4.std() / gaps4.mean() == pytest.approx(0.5, abs=0.05)  # gamma(k): CV 1/sqrt(k)
    assert arrival_times(50, 3.0, seed=1) == arrival_times(50, 3.0, seed=1) != arrival_times(50, 3.0, seed=2)
    for bad in [dict(n=0, request_rate=1.0), dict(n=3, request_rate=0.0), dict(n=3, request_rate=1, burstiness=0)]:
        with pytest.raises(ValueError):
            arrival_times(**bad)


def test_goodput_parsing() -> None:
    assert parse_goodput(["ttft:500", "tpot:50.5", "e2el:9000"]) == {"ttft": 500, "tpot": 50.5, "e2el": 9000}
    for bad in (["itl:5"], ["ttft"], ["ttft:fast"], ["ttft:0"]):
        with pytest.raises(ValueError, match="goodput"):
            parse_goodput(bad)


def test_workloads(tmp_path: Path) -> None:
    cfg = serving.BenchConfig(num_prompts=20, input_len=50, output_len=10, range_ratio=0.5, seed=7)
    a, b = serving.make_workload(cfg), serving.make_workload(cfg)
    assert a == b and a != serving.make_workload(serving.BenchConfig(num_prompts=20, input_len=50, seed=8))
    assert all(25 <= r.input_len <= 75 and 5 <= r.output_len <= 15 and len(r.prompt.split()) == r.input_len
               for r in a)
    fixed = serving.make_workload(serving.BenchConfig(dataset="fixed", num_prompts=3, input_len=4, output_len=9))
    assert len({r.prompt for r in fixed}) == 1 and fixed[0].input_len == 4 and fixed[0].output_len == 9
    f = tmp_path / "prompts.txt"
    f.write_text("first prompt\n\n  second one here \nthird\n")
    got = serving.make_workload(serving.BenchConfig(dataset="file", dataset_path=str(f), num_prompts=5))
    assert [r.prompt for r in got] == ["first prompt", "second one here", "third", "first prompt", "second one here"]
    with pytest.raises(ValueError, match="does not exist"):
        serving.make_workload(serving.BenchConfig(dataset="file", dataset_path=str(tmp_path / "nope")))
    with pytest.raises(ValueError, match="allowed"):
        serving.BenchConfig(dataset="alpaca")
    with pytest.raises(ValueError, match="needs --dataset-path"):
        serving.BenchConfig(dataset="sharegpt")


def test_sharegpt_workload_follows_vllms_sampling(tmp_path: Path) -> None:
    """First human turn as the prompt, its reply's length as max_tokens; one-turn conversations, prompts or replies
    under 4 tokens, prompts over 1024 and pairs over 2048 dropped; shuffled by the seed; lengths from the
    tokenizer when one is given."""
    from moelab.checkpoint.tokenizer import save_tokenizer

    def conv(prompt_words: int, reply_words: int, tag: str) -> dict:
        return {"id": tag, "conversations": [{"from": "human", "value": " ".join([tag] * prompt_words)},
                                             {"from": "gpt", "value": " ".join(["ok"] * reply_words)},
                                             {"from": "human", "value": "later turns are not used"}]}

    data = [conv(30, 60, f"keep{i}") for i in range(6)]
    data += [conv(2, 50, "short"), conv(30, 2, "shortreply"), conv(800, 10, "longprompt"),
             conv(600, 1000, "longpair"), {"id": "one", "conversations": [{"from": "human", "value": "alone"}]}]
    f = tmp_path / "sharegpt.json"
    f.write_text(json.dumps(data))
    cfg = serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=6, seed=3)
    got = serving.make_workload(cfg)
    assert sorted(r.prompt.split()[0] for r in got) == [f"keep{i}" for i in range(6)]
    assert got == serving.make_workload(cfg) and got != serving.make_workload(
        serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=6, seed=4))
    assert all(r.input_len == 40 and r.output_len == 80 for r in got)  # 4/3 tokens a word without a tokenizer
    fixed = serving.make_workload(serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=2,
                                                      sharegpt_output_len=7))
    assert [r.output_len for r in fixed] == [7, 7]
    save_tokenizer(tmp_path, 512)
    tok = tmp_path / "tokenizer.json"
    counted = serving.make_workload(serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=6,
                                                        seed=3, tokenizer_path=str(tok)))
    from tokenizers import Tokenizer

    t = Tokenizer.from_file(str(tok))
    assert all(r.input_len == len(t.encode(r.prompt).ids) for r in counted)
    tiny_replies = serving.make_workload(serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=7,
                                                             sharegpt_output_len=2))
    assert len(tiny_replies) == 7  # a fixed output length skips the reply-length check (as vLLM): "shortreply"
    with pytest.raises(ValueError, match="usable conversations"):
        serving.make_workload(serving.BenchConfig(dataset="sharegpt", dataset_path=str(f), num_prompts=7))
    f.write_text("{}")
    with pytest.raises(ValueError, match="JSON list"):
        serving.make_workload(serving.BenchConfig(dataset="sharegpt", dataset_path=str(f)))


def test_request_bodies() -> None:
    spec = serving.RequestSpec("a b c", 3, 7)
    body = serving.payload(serving.BenchConfig(extra_body={"top_k": 5}), "m", spec)
    assert body["prompt"] == "a b c" and body["max_tokens"] == 7 and body["ignore_eos"] and body["top_k"] == 5
    assert body["stream"] and body["stream_options"] == {"include_usage": True}
    chat = serving.payload(serving.BenchConfig(backend="openai-chat", dataset="fixed"), "m", spec)
    assert chat["messages"] == [{"role": "user", "content": "a b c"}] and chat["max_completion_tokens"] == 7
    assert "ignore_eos" not in chat  # off by default outside the random dataset


# ----- against a fake OpenAI server -----
CHUNK_DELAY, NUM_CHUNKS = 0.02, 5


def fake_openai_app() -> FastAPI:
    """Streams NUM_CHUNKS one-token chunks CHUNK_DELAY apart; prompts containing "fail" get a 500, "broken" an
    error event mid-stream."""
    app = FastAPI()
    state = {"inflight": 0, "peak": 0}
    app.state.fake = state

    @app.get("/v1/models")
    async def models() -> dict:
        return {"object": "list", "data": [{"id": "fake-model", "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        if "fail" in body["prompt"]:
            return JSONResponse({"error": {"message": "injected failure", "type": "x", "param": None,
                                           "code": None}}, status_code=500)

        async def events():
            state["inflight"] += 1
            state["peak"] = max(state["peak"], state["inflight"])
            try:
                for i in range(NUM_CHUNKS):
                    await asyncio.sleep(CHUNK_DELAY)
                    if i == 2 and "broken" in body["prompt"]:
                        yield 'data: {"error": {"message": "engine fell over"}}\n\n'
                        yield "data: [DONE]\n\n"
                        return
                    yield "data: " + json.dumps({"choices": [{"index": 0, "text": f"t{i} ", "finish_reason": None}],
                                                 "usage": None}) + "\n\n"
                usage = {"prompt_tokens": 11, "completion_tokens": NUM_CHUNKS, "total_tokens": 11 + NUM_CHUNKS}
                yield "data: " + json.dumps({"choices": [], "usage": usage}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                state["inflight"] -= 1

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


@pytest.fixture(scope="module")
def fake_url():
    app = fake_openai_app()
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    sock = bind_socket()
    t = threading.Thread(target=server.run, kwargs=dict(sockets=[sock]), daemon=True)
    t.start()
    while not server.started:
        time.sleep(0.01)
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", app.state.fake
    server.should_exit = True
    t.join(10)


class FakeStore:
    def __init__(self) -> None:
        self.runs: dict[str, dict] = {}

    def start_run(self, kind: str, config: dict, workload: dict) -> str:
        rid = f"run{len(self.runs)}"
        self.runs[rid] = {"kind": kind, "config": config, "workload": workload, "rows": [], "status": None}
        return rid

    def add(self, run_id: str, rows: list[dict]) -> int:
        self.runs[run_id]["rows"] += rows
        return len(rows)

    def finish_run(self, run_id: str, status: str = "ok", error: str | None = None) -> None:
        self.runs[run_id]["status"] = status


def test_run_against_a_fake_server_with_failures(fake_url, tmp_path: Path) -> None:
    url, fake = fake_url
    f = tmp_path / "p.txt"
    f.write_text("hello\nplease fail\nhello again\nbroken stream\n")
    cfg = serving.BenchConfig(base_url=url, dataset="file", dataset_path=str(f), num_prompts=12, num_warmups=1,
                              concurrencies=[1, 3], goodput={"ttft": 1000.0}, percentiles=[99])
    store = FakeStore()
    logs: list[str] = []
    results = serving.run(cfg, store, log=logs.append)
    assert [r["max_concurrency"] for r in results] == [1, 3] and fake["peak"] <= 3
    for r in results:
        assert (r["completed"], r["failed"], r["model_id"]) == (6, 6, "fake-model")
        assert r["failed_reasons"] == {"HTTP 500: injected failure": 3, "stream error: engine fell over": 3}
        assert r["total_output_tokens"] == 6 * NUM_CHUNKS and r["total_input_tokens"] == 6 * 11
        assert r["token_counts_from_usage"] and r["request_goodput"] == pytest.approx(r["request_throughput"])
        assert r["mean_ttft_ms"] >= CHUNK_DELAY * 1000 * 0.9 and r["median_itl_ms"] >= CHUNK_DELAY * 1000 * 0.9
        assert r["mean_tpot_ms"] == pytest.approx((r["mean_e2el_ms"] - r["mean_ttft_ms"]) / (NUM_CHUNKS - 1), rel=0.3)
        assert len(r["detailed"]["ttfts"]) == 12 and "p99_e2el_ms" in r
    assert results[0]["max_concurrent_requests"] == 1
    assert "Serving Benchmark Result" in logs[1] and "failed x3: HTTP 500: injected failure" in logs[1]
    (run0, rec0), (run1, rec1) = store.runs.items()
    assert rec0["kind"] == "serve" and rec0["config"]["max_concurrency"] == 1 and rec0["status"] == "ok"
    rows = {row["metric"]: row for row in rec1["rows"]}
    assert rows["completed"]["value"] == 6 and rows["p99_ttft_ms"]["unit"] == "ms"
    assert rows["output_throughput"]["max_concurrency"] == 3 and rows["output_throughput"]["request_rate"] == "inf"
    assert results[1]["run_id"] == run1


def test_wrong_model_and_dead_server_are_clear_errors(fake_url) -> None:
    url, _ = fake_url
    with pytest.raises(ValueError, match=r"model 'gpt-9' is not served .* it serves \['fake-model'\]"):
        serving.run(serving.BenchConfig(base_url=url, model="gpt-9", num_prompts=1), log=lambda s: None)
    with pytest.raises(ValueError, match="did not answer"):
        serving.run(serving.BenchConfig(base_url="http://127.0.0.1:9", num_prompts=1, ready_timeout=0.5),
                    log=lambda s: None)


def test_cli_sweep_writes_results_and_store(fake_url, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    url, _ = fake_url
    db = tmp_path / "results.sqlite"
    code = moelab_main(["bench", "serve", "--base-url", url, "--dataset-name", "fixed", "--num-prompts", "6",
                        "--request-rate", "200", "--burstiness", "inf", "--concurrency", "2", "--save-result",
                        "--result-dir", str(tmp_path / "out"), "--label", "fake", "--store", str(db),
                        "--metadata", "gpu=none"])
    assert code == 0
    last = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    (point,) = last["points"]
    assert point["request_rate"] == 200.0 and point["max_concurrency"] == 2 and point["gpu"] == "none"
    files = list((tmp_path / "out").glob("fake-200.0qps-concurrency2-fake-model-*.json"))
    assert len(files) == 1 and json.loads(files[0].read_text())["completed"] == 6
    from moelab.lab.store import ResultsStore

    rows = ResultsStore(db).rows()
    assert set(rows["metric"]) >= {"mean_ttft_ms", "p99_tpot_ms", "output_throughput", "completed"}
    with pytest.raises(SystemExit) as exit_:
        moelab_main(["bench", "serve", "--base-url", url, "--goodput", "itl:5", "--no-store"])
    assert exit_.value.code == 2 and "expected KEY:MS with KEY one of ttft, tpot, e2el" in capsys.readouterr().err


def test_append_result_adds_one_line_per_point(fake_url, tmp_path: Path) -> None:
    """B6: --append-result keeps what the file held and adds each point as a line (a sweep into one file)."""
    url, _ = fake_url
    args = ["bench", "serve", "--base-url", url, "--dataset-name", "fixed", "--num-prompts", "2", "--request-rate",
            "200", "--burstiness", "inf", "--concurrency", "1", "2", "--no-store", "--result-dir", str(tmp_path),
            "--result-filename", "all.jsonl", "--append-result"]
    assert moelab_main(args) == 0 and moelab_main(args) == 0
    lines = (tmp_path / "all.jsonl").read_text().splitlines()
    assert [json.loads(ln)["max_concurrency"] for ln in lines] == [1, 2, 1, 2]
    assert all(json.loads(ln)["completed"] == 2 for ln in lines)


def test_against_moelab_serve() -> None:
    srv = LiveServer(make_engine(), served_model_names=["tiny"])
    try:
        cfg = serving.BenchConfig(base_url=srv.url, num_prompts=24, input_len=8, output_len=6, concurrencies=[4],
                                  backend="openai-chat")
        (r,) = serving.run(cfg, log=lambda s: None)
        assert (r["completed"], r["failed"], r["total_output_tokens"]) == (24, 0, 24 * 6)
        assert r["token_counts_from_usage"] and r["max_concurrent_requests"] <= 4 and r["mean_tpot_ms"] > 0
    finally:
        srv.stop()


def test_the_benchmark_imports_no_engine_code() -> None:
    code = ("import sys, moelab.lab.serving, moelab.lab.launch; "
            "bad = [m for m in sys.modules if m == 'torch' or m.startswith(('moelab.engine', 'moelab.server'))]; "
            "assert not bad, bad")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).returncode == 0


def test_every_token_of_a_full_vocab_synthetic_model_streams_as_its_own_chunk() -> None:
    """A synthetic model samples ids across its whole vocab; each must decode to text, else the server has nothing
    to send until the end and TTFT = E2EL (seen on the GPU with the 50k-vocab OLMoE preset)."""
    srv = LiveServer(LLMEngine(EngineConfig(model="olmoe-1b-7b", overrides={**TINY, "vocab_size": 4096},
                                            max_model_len=MAX_MODEL_LEN)), served_model_names=["tiny"])
    try:
        body = {"model": "tiny", "prompt": "hello world", "max_tokens": 12, "ignore_eos": True, "stream": True,
                "temperature": 1.0, "seed": 3}
        with httpx.Client(base_url=srv.url, timeout=60) as client, client.stream("POST", "/v1/completions",
                                                                                 json=body) as resp:
            texts = [json.loads(line[5:])["choices"][0]["text"] for line in resp.iter_lines()
                     if line.startswith("data:") and "[DONE]" not in line]
        # a chunk can carry two tokens (a byte-level token that ends mid-character, or two steps queued while the
        # event loop was busy); without text for every id, only the ~1/8 of ids below the BPE's 512 would stream
        assert len([t for t in texts if t]) >= 9, texts
    finally:
        srv.stop()
