"""The OpenAI-compatible server on the tiny CPU model: reliability.md §3 (V1-V10, L1-L7, S1-S7, C1-C2, P1-P3, F0-F1,
G1-G2, A1-A2), the official `openai` client, and a load test of 1,000 concurrent streams with nothing lost."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from itertools import count

import httpx
import load_client
import pytest
import torch
from fastapi.testclient import TestClient
from server_helpers import MAX_MODEL_LEN, LiveServer, make_engine, parse_sse, stream_text, wait_idle

from moelab.cli import main
from moelab.engine.detokenizer import IncrementalDetokenizer
from moelab.engine.sampling_params import SamplingParams
from moelab.server.app import create_app
from moelab.server.engine_loop import EngineLoop, EngineRequest
from moelab.server.metrics import ServerMetrics

GREEDY = {"temperature": 0, "ignore_eos": True}


@pytest.fixture(scope="module")
def live() -> LiveServer:
    srv = LiveServer(make_engine(), served_model_names=["tiny", "tiny-alias"])
    yield srv
    srv.stop()


@pytest.fixture
def client(live: LiveServer) -> httpx.Client:
    with httpx.Client(base_url=live.url, timeout=60) as c:
        yield c
    wait_idle(live.state, live.engine)  # I0 after every test that sent traffic


def complete(c: httpx.Client, **body) -> dict:
    r = c.post("/v1/completions", json={"model": "tiny", **body})
    assert r.status_code == 200, r.text
    return r.json()


def assert_error(r: httpx.Response, status: int, param: str | None = "-", contains: str = "") -> dict:
    assert r.status_code == status, (r.status_code, r.text)
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"} and contains in err["message"], err
    if param != "-":
        assert err["param"] == param, err
    return err


# ----- health, models (F0) -----
def test_health_and_models(client: httpx.Client) -> None:
    assert client.get("/health").status_code == 200
    data = client.get("/v1/models").json()
    assert data["object"] == "list" and [m["id"] for m in data["data"]] == ["tiny", "tiny-alias"]
    assert all(m["max_model_len"] == MAX_MODEL_LEN and m["object"] == "model" for m in data["data"])


# ----- validation (V1-V10) -----
@pytest.mark.parametrize("body", [b"{x", b'"a string"', b"[1, 2]", b"3", b"null", b"", b'{"prompt": NaN}',
                                  b'{"prompt": "a", "temperature": 1e999}', b"\xff\xfe\x00", b"[" * 100000])
def test_v1_malformed_bodies_are_400(client: httpx.Client, body: bytes) -> None:
    assert_error(client.post("/v1/completions", content=body, headers={"content-type": "application/json"}), 400)
    assert client.get("/health").status_code == 200


def test_v1_wrong_content_type_is_400(client: httpx.Client) -> None:
    assert_error(client.post("/v1/completions", data={"prompt": "hi"}), 400, contains="Content-Type")


@pytest.mark.parametrize("path,body,param", [
    ("/v1/completions", {}, "prompt"), ("/v1/completions", {"prompt": ""}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"), ("/v1/completions", {"prompt": ["a", ""]}, "prompt"),
    ("/v1/chat/completions", {}, "messages"), ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"content": "hi"}]}, "messages.0.role"),
])
def test_v2_missing_or_empty_fields(client: httpx.Client, path: str, body: dict, param: str) -> None:
    assert_error(client.post(path, json=body), 400, param)


def test_v3_unknown_model_is_404(client: httpx.Client) -> None:
    err = assert_error(client.post("/v1/completions", json={"model": "gpt-9", "prompt": "hi"}), 404, "model")
    assert err["message"] == "The model `gpt-9` does not exist."


@pytest.mark.parametrize("field,value", [
    ("max_tokens", 0), ("max_tokens", -1), ("temperature", -0.5), ("top_p", 0), ("top_p", 1.5), ("top_k", -2),
    ("n", 0), ("n", 129), ("min_tokens", -1), ("stop", [""]), ("stop", ["a", ""]), ("logprobs", 5), ("echo", True),
    ("presence_penalty", 0.5), ("logit_bias", {"5": 1.0}), ("seed", 2**64), ("top_k", 2**40), ("best_of", 3),
    ("guided_json", {"type": "object"}), ("guided_choice", ["a", "b"]), ("structured_outputs", {"regex": "a+"}),
    ("allowed_token_ids", [5, 6]), ("allowed_token_ids", [999999]), ("bad_words", ["x"]), ("use_beam_search", True),
    ("prompt_logprobs", 1), ("prompt_logprobs", 0), ("length_penalty", 0.5), ("structural_tag", {"x": 1}),
    ("stop", [f"s{i}" for i in range(257)]),
])
def test_v4_bad_parameters_are_400_naming_the_field(client: httpx.Client, field: str, value) -> None:
    err = assert_error(client.post("/v1/completions", json={"prompt": "hi", field: value}), 400)
    assert err["param"] is not None and err["param"].split(".")[0] == field, err


@pytest.mark.parametrize("body,param", [
    ({"prompt": "hi", "stop": [1]}, "stop.0"), ({"prompt": [1, "a"]}, "prompt.1"), ({"prompt": {"a": 1}}, "prompt"),
])
def test_v4_a_union_field_is_named_without_pydantic_branch_tags(client: httpx.Client, body: dict, param: str
                                                               ) -> None:
    """A field that takes several types (stop: str | list[str], prompt: str | list[int] | ...) is reported by its
    name and index, not by pydantic's branch tags ("stop.str", "prompt.list[int]"), and each message once."""
    err = assert_error(client.post("/v1/completions", json=body), 400)
    assert err["param"] in (param, param.split(".")[0]), err
    assert "[" not in err["message"] and ".str:" not in err["message"], err
    parts = err["message"].split("; ")
    assert len(parts) == len(set(parts)), err


def test_v5_stop_token_ids_are_bounded(client: httpx.Client) -> None:
    """Each stop id is tested at every token: a request cannot bring more than MAX_STOP_TOKEN_IDS distinct ones;
    repeats count once (and the engine keeps one of each)."""
    from moelab.server.preprocess import MAX_STOP_TOKEN_IDS

    assert_error(client.post("/v1/completions", json={"prompt": "hi", "stop_token_ids": list(range(
        MAX_STOP_TOKEN_IDS + 1))}), 400, "stop_token_ids", contains="distinct")
    ok = complete(client, prompt="hi", max_tokens=3, stop_token_ids=[7] * 5000, **GREEDY)
    assert ok["choices"][0]["finish_reason"] in ("length", "stop")
    assert SamplingParams(stop_token_ids=[7, 3, 7, 3, 9]).stop_token_ids == [7, 3, 9]


def test_v4_a_top_p_that_rounds_to_zero_is_greedy(client: httpx.Client) -> None:
    want = complete(client, prompt="The router", max_tokens=8, **GREEDY)["choices"][0]["text"]
    got = complete(client, prompt="The router", max_tokens=8, top_p=1e-300, seed=1, ignore_eos=True)
    assert got["choices"][0]["text"] == want
    # top_k and top_p reach the engine: at temperature 1 they leave only the greedy path, and without them the
    # same seeds leave it
    for kw in ({"top_k": 1}, {"top_p": 1e-6}):
        got = complete(client, prompt="The router", max_tokens=8, temperature=1.0, n=3, seed=5, ignore_eos=True, **kw)
        assert all(c["text"] == want for c in got["choices"]), kw
    free = complete(client, prompt="The router", max_tokens=8, temperature=1.0, n=3, seed=5, ignore_eos=True)
    assert any(c["text"] != want for c in free["choices"])


def test_v4_min_tokens_above_max_tokens(client: httpx.Client) -> None:
    assert_error(client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 2, "min_tokens": 5}), 400,
                 "min_tokens")


@pytest.mark.parametrize("body,param", [
    ({"prompt": [-1]}, "prompt"), ({"prompt": [512]}, "prompt"), ({"prompt": [[1, 2], [3, 99999]]}, "prompt"),
    ({"prompt": "hi", "stop_token_ids": [512]}, "stop_token_ids"),
    ({"prompt": "hi", "stop_token_ids": [1], "min_tokens": 2, "max_tokens": 4, "logit_bias": {"99999": 5}},
     "logit_bias"),
])
def test_v5_out_of_vocab_ids_never_reach_the_engine(client: httpx.Client, body: dict, param: str) -> None:
    err = assert_error(client.post("/v1/completions", json=body), 400, param)
    assert param != "prompt" or "out of vocabulary" in err["message"]
    assert complete(client, prompt="still alive", max_tokens=2)["choices"][0]["finish_reason"] == "length"


def test_v6_stream_options_without_stream(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "hi", "stream_options": {"include_usage": True}})
    err = assert_error(r, 400, "stream_options")
    assert err["message"] == "Stream options can only be defined when `stream=True`."


def test_v7_unknown_fields_are_accepted(client: httpx.Client, caplog) -> None:
    """Accepted and logged; the constraint fields of other servers only when neutral (unset, false, empty)."""
    from moelab.server import preprocess

    preprocess._logged_unknown.discard("some_future_field")
    preprocess._logged_unknown.discard("metadata")
    with caplog.at_level("INFO", logger="moelab.server.preprocess"):
        out = complete(client, prompt="hi", max_tokens=2, some_future_field={"x": 1}, metadata="y")
    assert out["usage"]["completion_tokens"] <= 2
    assert "'metadata', 'some_future_field'" in caplog.text
    caplog.clear()
    with caplog.at_level("INFO", logger="moelab.server.preprocess"):
        complete(client, prompt="hi", max_tokens=2, some_future_field=1)
    assert "some_future_field" not in caplog.text  # logged once, not once per request
    out = complete(client, prompt="hi", max_tokens=2, use_beam_search=False, bad_words=[], guided_json=None,
                   length_penalty=1.0)
    assert out["usage"]["completion_tokens"] <= 2


def test_v8_error_bodies_stay_small(client: httpx.Client) -> None:
    body = {"messages": [{"role": 1, "content": 2}] * 5000, "n": "many", "x" * 10000: 1}
    r = client.post("/v1/chat/completions", json=body)
    assert_error(r, 400, contains="more error(s)")
    assert len(r.content) < 2000


def test_v10_model_alias_omitted_model_and_request_id(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"model": "tiny-alias", "prompt": "hi", "max_tokens": 1},
                    headers={"X-Request-Id": "client-42"})
    assert r.status_code == 200 and r.json()["model"] == "tiny-alias" and r.json()["id"] == "cmpl-client-42"
    assert r.headers["x-request-id"] == "client-42"
    r = client.post("/v1/completions", json={"prompt": "hi", "max_tokens": 1}, headers={"X-Request-Id": "client-42"})
    assert r.status_code == 200 and r.json()["model"] == "tiny"  # the same client id twice is fine


# ----- context length (L1-L7) -----
def test_l1_prompt_at_or_over_the_context(client: httpx.Client) -> None:
    for n in (MAX_MODEL_LEN, MAX_MODEL_LEN + 50):
        err = assert_error(client.post("/v1/completions", json={"prompt": [5] * n}), 400, "input_tokens")
        assert f"maximum context length is {MAX_MODEL_LEN} tokens. However, your request has {n} input tokens" \
            in err["message"]


def test_l2_prompt_plus_max_tokens_over_the_context(client: httpx.Client) -> None:
    err = assert_error(client.post("/v1/completions", json={"prompt": [5] * 200, "max_tokens": 100}), 400,
                       "max_tokens")
    assert f"(100 > {MAX_MODEL_LEN} - 200)" in err["message"]
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}],
                                                  "max_completion_tokens": 10_000})
    assert_error(r, 400, "max_tokens")


def test_l3_default_max_tokens(client: httpx.Client) -> None:
    assert complete(client, prompt="hello", **GREEDY)["usage"]["completion_tokens"] == 16  # OpenAI's default
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}], **GREEDY})
    u = r.json()["usage"]
    assert r.json()["choices"][0]["finish_reason"] == "length" and u["total_tokens"] == MAX_MODEL_LEN
    u = complete(client, prompt="hello", max_tokens=None, **GREEDY)["usage"]  # explicit null: the context
    assert u["total_tokens"] == MAX_MODEL_LEN


def test_l4_exact_fit(client: httpx.Client) -> None:
    u = complete(client, prompt=[7] * 200, max_tokens=MAX_MODEL_LEN - 200, **GREEDY)["usage"]
    assert (u["prompt_tokens"], u["completion_tokens"], u["total_tokens"]) == (200, 56, MAX_MODEL_LEN)


def test_l6_batch_with_one_prompt_too_long(client: httpx.Client) -> None:
    err = assert_error(client.post("/v1/completions", json={"prompt": [[1, 2], [3] * 300]}), 400, "input_tokens")
    assert "(prompt 1)" in err["message"]


def test_l7_body_limit_with_and_without_content_length() -> None:
    app = create_app(make_engine(), max_body_bytes=1000)
    with TestClient(app) as c:
        assert_error(c.post("/v1/completions", json={"prompt": "x" * 2000}), 413)
        chunks = (b'{"prompt": "' + b"x" * 300 + b'"' if i == 0 else b" " * 300 for i in range(5))
        assert_error(c.post("/v1/completions", content=chunks, headers={"content-type": "application/json"}), 413)
        assert c.post("/v1/completions", json={"prompt": "ok", "max_tokens": 1}).status_code == 200


# ----- streaming (S1-S7) -----
@pytest.mark.parametrize("chat", [False, True])
def test_s1_s2_s3_stream_equals_non_stream(client: httpx.Client, chat: bool) -> None:
    path = "/v1/chat/completions" if chat else "/v1/completions"
    body = ({"messages": [{"role": "user", "content": "tell me"}]} if chat else {"prompt": "tell me"}) | \
        {"max_tokens": 24, **GREEDY}
    plain = client.post(path, json=body).json()
    r = client.post(path, json={**body, "stream": True, "stream_options": {"include_usage": True}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = parse_sse(r.text)
    assert all(e["object"] == ("chat.completion.chunk" if chat else "text_completion") for e in events[:-1])
    if chat:
        assert events[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    usage_events = [e for e in events[:-1] if e["usage"] is not None]
    assert usage_events == [events[-2]] and events[-2]["choices"] == [] and events[-2]["usage"] == plain["usage"]
    got = stream_text(events, chat)[0]
    want = plain["choices"][0]["message"]["content"] if chat else plain["choices"][0]["text"]
    assert got["text"] == want and got["finish"] == ["length"]
    assert plain["usage"]["completion_tokens"] == 24


def test_s4_n_choices_stream(client: httpx.Client) -> None:
    r = client.post("/v1/completions", json={"prompt": "abc", "n": 3, "max_tokens": 7, "stream": True, "seed": 1,
                                             "ignore_eos": True, "stream_options": {"include_usage": True}})
    events = parse_sse(r.text)
    per = stream_text(events, chat=False)
    assert sorted(per) == [0, 1, 2] and all(d["finish"] == ["length"] for d in per.values())
    assert events[-2]["usage"]["completion_tokens"] == 21


def test_s6_stop_strings_and_include_stop_str(client: httpx.Client) -> None:
    full = complete(client, prompt="once upon", max_tokens=30, **GREEDY)["choices"][0]["text"]
    start = next(i for i in range(4, len(full) - 3) if "\ufffd" not in full[i:i + 3])
    stop = full[start:start + 3]
    want = full[:full.index(stop)]
    for stream in (False, True):
        r = client.post("/v1/completions", json={"prompt": "once upon", "max_tokens": 30, "stop": [stop, "zzzz"],
                                                 "stream": stream, **GREEDY})
        if stream:
            got = stream_text(parse_sse(r.text), chat=False)[0]
            text, finish = got["text"], got["finish"][0]
        else:
            choice = r.json()["choices"][0]
            text, finish = choice["text"], choice["finish_reason"]
            assert choice["stop_reason"] == stop
        assert (text, finish) == (want, "stop")
    out = complete(client, prompt="once upon", max_tokens=30, stop=stop, include_stop_str_in_output=True, **GREEDY)
    assert out["choices"][0]["text"] == want + stop


def test_s5_an_exception_after_the_200_still_ends_the_stream_with_an_error_and_done(
        client: httpx.Client, live: LiveServer, monkeypatch) -> None:
    """A bug that raises while the events are made (here the detokenizing step) cannot leave the client with a
    cut connection: the stream ends with an error event in OpenAI's shape and [DONE], and the request is aborted
    (wait_idle in the fixture), counted as no client disconnect."""
    from moelab.server import generation

    def boom(self, u):
        raise RuntimeError("a bug")

    disconnects = live.state.metrics.disconnected
    monkeypatch.setattr(generation.ChoiceText, "advance", boom)
    r = client.post("/v1/completions", json={"prompt": "abc", "max_tokens": 50, "stream": True, **GREEDY})
    assert r.status_code == 200 and r.text.endswith("data: [DONE]\n\n")
    err = parse_sse(r.text)[-2]["error"]
    assert set(err) == {"message", "type", "param", "code"} and "RuntimeError" in err["message"]
    monkeypatch.undo()
    wait_idle(live.state, live.engine)
    assert live.state.metrics.disconnected == disconnects


def test_v3_text_prompts_get_the_tokenizers_special_tokens_as_in_vllm(live: LiveServer) -> None:
    """A completion's text prompt is encoded with the tokenizer's special tokens (a BOS, when its post-processor
    adds one), a chat prompt without them (the template writes them), each switchable by add_special_tokens."""
    from dataclasses import replace

    from tokenizers import Tokenizer, processors

    from moelab.server.preprocess import prepare
    from moelab.server.protocol import ChatCompletionRequest, CompletionRequest

    tok = Tokenizer.from_str(live.engine.tokenizer.to_str())
    bos = 3
    tok.post_processor = processors.TemplateProcessing(single="<b>:0 $A:0", special_tokens=[("<b>", bos)])
    ctx = replace(live.app.state.server.model, tokenizer=tok)
    plain = tok.encode("hello there", add_special_tokens=False).ids
    got = prepare(CompletionRequest(prompt="hello there"), ctx).prompts[0]
    assert got == [bos, *plain]
    assert prepare(CompletionRequest(prompt="hello there", add_special_tokens=False), ctx).prompts[0] == plain
    chat = {"messages": [{"role": "user", "content": "hi"}]}
    assert prepare(ChatCompletionRequest(**chat), ctx).prompts[0][0] != bos
    assert prepare(ChatCompletionRequest(**chat, add_special_tokens=True), ctx).prompts[0][0] == bos


def test_s7_detokenizer_never_splits_a_character(live: LiveServer) -> None:
    tok = live.engine.tokenizer
    text = "héllo wörld 🙂 ünïcödé ✓ 日本語"
    ids = tok.encode(text, add_special_tokens=False).ids
    d = IncrementalDetokenizer(tok)
    deltas = [d.push([t]) for t in ids]
    assert all("\ufffd" not in x for x in deltas) and "".join(deltas) == text == d.text


# ----- cancellation (C1-C2) -----
def test_an_abort_that_trips_the_idle_check_still_ends_its_request() -> None:
    """The engine dies when its idle check fails during an abort (a leak), but the aborted request, already off the
    loop's streams, still gets its one final update, and the engine is then reported dead."""
    from moelab.engine.block_manager import KVCacheLeakError

    engine = make_engine()
    engine_loop = EngineLoop(engine)
    original = engine.abort_request

    def abort_then_trip(rid: str) -> bool:
        original(rid)
        raise KVCacheLeakError("simulated leak")

    engine.abort_request = abort_then_trip

    async def main() -> tuple[str, bool]:
        q = await engine_loop.add([EngineRequest("leak-0", [5, 6, 7], SamplingParams(max_tokens=200, ignore_eos=True))],
                                  time.perf_counter())
        await q.get()  # it runs
        engine_loop.abort(["leak-0"])
        while True:
            u = await asyncio.wait_for(q.get(), 10)
            if u.finished:
                return u.finish_reason, True

    try:
        reason, _ = asyncio.run(main())
    finally:
        engine_loop.shutdown()
    assert reason == "abort" and isinstance(engine_loop.dead, KVCacheLeakError)


def test_c1_engine_loop_abort_flood() -> None:
    engine = make_engine()
    engine_loop = EngineLoop(engine)

    async def main() -> None:
        reqs = [EngineRequest(f"c1-{i}", [5, 6, 7 + i], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True))
                for i in range(100)]
        q = await engine_loop.add(reqs, time.perf_counter())
        await asyncio.sleep(0.05)
        engine_loop.abort([f"c1-{i}" for i in range(0, 100, 10)])
        finals, tokens = {}, [0] * 100
        while len(finals) < 100:
            u = await q.get()
            tokens[u.index] += len(u.token_ids)
            if u.finished:
                assert u.index not in finals
                finals[u.index] = u.finish_reason
        for i in range(100):  # an aborted request may have finished first; every other one is complete
            assert finals[i] in (("abort", "length") if i % 10 == 0 else ("length",)) and \
                (finals[i] == "abort" or tokens[i] == 40), (i, finals[i], tokens[i])
        assert sum(f == "abort" for f in finals.values()) > 0
        q2 = await engine_loop.add([EngineRequest("c1-0", [1, 2], SamplingParams(max_tokens=2))], time.perf_counter())
        while not (await q2.get()).finished:  # the id of an aborted request can be used again
            pass

    try:
        asyncio.run(main())
    finally:
        engine_loop.shutdown()
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.num_blocks - 1 and engine_loop.num_requests == 0


def test_c4_abort_while_queued_prefilling_decoding_or_preempted() -> None:
    """A KV pool of 23 blocks (368 tokens) for 16 requests of 5 + 60 tokens: requests wait, get preempted and
    recomputed; aborting some at every stage still leaves every block free and the others complete."""
    engine = make_engine(num_kv_blocks=24, max_num_batched_tokens=32)
    engine_loop = EngineLoop(engine)

    async def main() -> dict[int, tuple[str, int]]:
        params = SamplingParams(temperature=0, max_tokens=60, ignore_eos=True)
        q = await engine_loop.add([EngineRequest(f"c4-{i}", [9, 8, 7, 6, i], params) for i in range(16)],
                                  time.perf_counter())
        finals, tokens, aborted = {}, [0] * 16, 0
        while len(finals) < 16:
            u = await q.get()
            tokens[u.index] += len(u.token_ids)
            if u.finished:
                finals[u.index] = (u.finish_reason, tokens[u.index])
            if sum(tokens) > 60 * (aborted + 1) and aborted < 6:  # abort at spread-out moments
                engine_loop.abort([f"c4-{15 - aborted}"])
                aborted += 1
        return finals

    try:
        finals = asyncio.run(main())
    finally:
        engine_loop.shutdown()
    assert engine.scheduler.num_preemptions > 0
    assert sum(reason == "abort" for reason, _ in finals.values()) >= 1
    assert all(n == 60 for reason, n in finals.values() if reason == "length")
    assert not engine.scheduler.running and not engine.scheduler.waiting and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.num_blocks - 1


def test_c3_connection_reset_mid_stream_frees_everything(client: httpx.Client, live: LiveServer) -> None:
    """C3: clients that reset the TCP connection (RST, not FIN) mid-stream, streaming and not: every request is
    aborted and counted, every block freed, the server goes on."""
    import socket
    import struct

    host, port = live.url.rsplit("//", 1)[1].split(":")
    before = live.state.metrics.disconnected

    def reset_after_first_bytes(stream: bool) -> None:
        body = json.dumps({"prompt": "reset me", "max_tokens": 200, "stream": stream, **GREEDY}).encode()
        s = socket.create_connection((host, int(port)), timeout=30)
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        if stream:
            assert s.recv(1) == b"H"  # the response has started
        else:
            time.sleep(0.05)  # in flight, before its response
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close() sends RST
        s.close()

    for i in range(10):
        reset_after_first_bytes(stream=i % 2 == 0)
    wait_idle(live.state, live.engine)
    assert live.state.metrics.disconnected - before == 10
    assert complete(client, prompt="after the resets", max_tokens=3)["usage"]["completion_tokens"] <= 3


def test_c2_disconnect_flood_frees_everything(client: httpx.Client, live: LiveServer) -> None:
    before = live.state.metrics.disconnected
    body = {"prompt": "long story", "max_tokens": 200, **GREEDY}

    async def main() -> None:
        async with httpx.AsyncClient(base_url=live.url, timeout=60, limits=httpx.Limits(max_connections=200)) as ac:
            async def stream_then_hang_up() -> None:
                async with ac.stream("POST", "/v1/completions", json={**body, "stream": True}) as r:
                    async for line in r.aiter_lines():
                        if line.startswith("data:"):
                            return  # closes the connection mid-stream

            async def time_out() -> None:
                with pytest.raises(httpx.ReadTimeout):  # only the read times out: a slow connect under the flood
                    await ac.post("/v1/chat/completions", timeout=httpx.Timeout(60, read=0.3),  # is no hang-up
                                  json={"messages": [{"role": "user", "content": "hi"}], **body})

            await asyncio.gather(*[stream_then_hang_up() for _ in range(60)], *[time_out() for _ in range(40)])

    asyncio.run(main())
    wait_idle(live.state, live.engine)
    assert live.state.metrics.disconnected - before == 100
    assert complete(client, prompt="after the flood", max_tokens=3)["usage"]["completion_tokens"] <= 3


def test_p4_p6_overload_with_hang_ups_drains_and_leaves_nothing_alive() -> None:
    """P4 and P6 scaled to CI: Poisson arrivals at several times what a server of 2 running sequences can serve,
    mixed lengths, a third of the clients hanging up mid-stream. No deadlock: every request ends (the others with
    their full length), the waiting gauge rises and drains to 0, queueing shows in TTFT; afterwards I0, and no
    engine Sequence or per-request stream object is still alive."""
    import gc
    import random

    from moelab.engine.sequence import Sequence
    from moelab.server.engine_loop import RequestStream

    srv = LiveServer(make_engine(max_num_seqs=2), served_model_names=["tiny"])
    rng = random.Random(7)
    peak_waiting, ttft = [0.0], {}

    async def main() -> list[tuple[int, str | None, int]]:
        async with httpx.AsyncClient(base_url=srv.url, timeout=120, limits=httpx.Limits(max_connections=100)) as ac:
            done = asyncio.Event()

            async def watch() -> None:
                while not done.is_set():
                    text = (await ac.get("/metrics")).text
                    m = re.search(r'moelab:num_requests_waiting\{model_name="tiny"\} (\S+)', text)
                    peak_waiting[0] = max(peak_waiting[0], float(m.group(1)))
                    await asyncio.sleep(0.02)

            async def one(i: int, delay: float) -> tuple[int, str | None, int]:
                await asyncio.sleep(delay)
                n, hang_up = rng.randint(1, 24), i % 3 == 0
                t0, tokens, finish = time.perf_counter(), 0, None
                body = {"prompt": f"request {i} " * rng.randint(1, 8), "max_tokens": n, "stream": True, **GREEDY}
                async with ac.stream("POST", "/v1/completions", json=body) as r:
                    async for line in r.aiter_lines():
                        if not line.startswith("data: ") or line == "data: [DONE]":
                            continue
                        choice = json.loads(line[6:])["choices"][0]
                        tokens += bool(choice["text"])
                        if tokens == 1 and i not in ttft:
                            ttft[i] = time.perf_counter() - t0
                        finish = choice["finish_reason"] or finish
                        if hang_up:
                            return i, "hung up", n
                return i, finish, n

            t, arrivals = 0.0, []
            for _ in range(48):
                t += rng.expovariate(400.0)  # far above what two sequences at a time serve
                arrivals.append(t)
            watcher = asyncio.create_task(watch())
            out = await asyncio.gather(*[one(i, a) for i, a in enumerate(arrivals)])
            done.set()
            await watcher
            return out

    try:
        results = asyncio.run(main())
        wait_idle(srv.state, srv.engine, timeout=30)
        assert all(f == "length" for i, f, n in results if i % 3), [r for r in results if r[1] != "length"][:3]
        assert peak_waiting[0] >= 10  # the queue rose ...
        waiting = re.search(r'moelab:num_requests_waiting\{model_name="tiny"\} (\S+)',
                            httpx.get(srv.url + "/metrics").text)
        assert float(waiting.group(1)) == 0  # ... and drained
        firsts = sorted(ttft.values())
        assert firsts[-1] > 3 * firsts[0]  # the last admitted waited behind the others
    finally:
        srv.stop()
    gc.collect()
    alive = [o for o in gc.get_objects() if type(o) in (Sequence, RequestStream)]
    assert not alive, f"{len(alive)} per-request objects outlived their requests: {alive[:3]}"


# ----- determinism, load (P1-P3) -----
def test_seeded_sampling_is_reproducible_under_load(client: httpx.Client, live: LiveServer) -> None:
    body = {"prompt": "random walk", "max_tokens": 16, "temperature": 1.0, "seed": 1234, "ignore_eos": True}
    alone = complete(client, **body)["choices"][0]["text"]
    assert complete(client, **body)["choices"][0]["text"] == alone

    async def main() -> list[str]:
        async with httpx.AsyncClient(base_url=live.url, timeout=60) as ac:
            others = [ac.post("/v1/completions", json={**body, "seed": None, "prompt": f"noise {i}"})
                      for i in range(8)]
            rs = await asyncio.gather(ac.post("/v1/completions", json=body), *others)
            return [r.json()["choices"][0]["text"] for r in rs]

    assert asyncio.run(main())[0] == alone
    n3 = complete(client, **body, n=3)["choices"]
    assert n3[0]["text"] == alone and len({c["text"] for c in n3}) == 3  # seed + i per choice


def test_p1_load_1000_concurrent_streams_nothing_lost(client: httpx.Client, live: LiveServer) -> None:
    """1,000 streams at once from a client process: each ends exactly once, with the tokens its prompt gives
    alone (greedy), the framing right; then nothing is left in the engine and every KV block is free."""
    N, P, T = 1000, 50, 8
    alone = [complete(client, prompt=load_client.prompt(p), max_tokens=T, **GREEDY)["choices"][0]["text"]
             for p in range(P)]
    finished_before = live.state.metrics.success["length"]
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, load_client.__file__, live.url, str(N), str(P), str(T)],
                          capture_output=True, text=True, timeout=300)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])["results"]
    failures = [r for r in results if r["error"]]
    print(f"\nload test: {N} concurrent streaming requests x {T} tokens: {seconds:.1f} s wall "
          f"(client process included), {len(failures)} failures")
    assert not failures, failures[:3]
    assert sorted(r["i"] for r in results) == list(range(N))  # every request ended exactly once
    for r in results:
        assert (r["text"], r["tokens"], r["finish"]) == (alone[r["i"] % P], T, "length"), r  # its own tokens
    wait_idle(live.state, live.engine)
    assert live.state.metrics.success["length"] - finished_before == N


def test_metrics_exposition(client: httpx.Client) -> None:
    complete(client, prompt="for the metrics", max_tokens=4, **GREEDY)
    text = client.get("/metrics").text
    lines = text.strip().split("\n")
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in lines if not ln.startswith("#")}
    for name in ("time_to_first_token_seconds", "inter_token_latency_seconds", "e2e_request_latency_seconds",
                 "request_time_per_output_token_seconds"):
        assert f"# TYPE moelab:{name} histogram" in text
        count_ = samples[f'moelab:{name}_count{{model_name="tiny"}}']
        assert count_ > 0 and samples[f'moelab:{name}_bucket{{model_name="tiny",le="+Inf"}}'] == count_
    for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "prompt_tokens_total",
                 "generation_tokens_total"):
        assert f'moelab:{name}{{model_name="tiny"}}' in samples
    assert samples['moelab:request_success_total{model_name="tiny",finished_reason="length"}'] > 0
    assert samples['moelab:num_requests_running{model_name="tiny"}'] == 0


def test_metrics_prefix_gives_vllms_names(capsys) -> None:
    """O4: --metrics-prefix vllm: exposes the same families under vLLM's names (its dashboards work); a prefix
    Prometheus would reject is refused before anything starts."""
    m = ServerMetrics("tiny", lambda: {"num_running": 2}, prefix="vllm:")
    text = m.render()
    assert "# TYPE vllm:time_to_first_token_seconds histogram" in text
    assert 'vllm:num_requests_running{model_name="tiny"} 2' in text and "moelab:" not in text
    assert text.count("# TYPE ") == ServerMetrics("tiny").render().count("# TYPE moelab:")
    for bad in ("", "9x:", "vllm-", "a b"):
        with pytest.raises(ValueError, match="Prometheus metric names take letters"):
            ServerMetrics("tiny", prefix=bad)
    assert main(["serve", "no-such-model", "--metrics-prefix", "bad-"]) == 2  # refused before the model is looked up
    assert "metrics prefix 'bad-'" in capsys.readouterr().err


def test_counters_equal_the_workload_exactly() -> None:
    """O1/O3: on a fresh server, each counter equals what the responses say: tokens generated, prompt tokens
    prefilled (each choice prefills its prompt: n=3 counts it three times), finishes by reason, one abort and one
    disconnect for a client that hangs up, latencies observed once per request."""
    engine = make_engine()
    app = create_app(engine)
    with TestClient(app) as c:
        r1 = c.post("/v1/completions", json={"prompt": "count me", "max_tokens": 4, **GREEDY}).json()
        r2 = c.post("/v1/completions", json={"prompt": "count me too", "max_tokens": 3, "n": 3, **GREEDY}).json()
        first = r1["choices"][0]["text"]
        r3 = c.post("/v1/completions", json={"prompt": "count me", "max_tokens": 4, "stop": first[1:3], **GREEDY})
        r3 = r3.json()
        assert r3["choices"][0]["finish_reason"] == "stop"
        with c.stream("POST", "/v1/completions",
                      json={"prompt": "aborted", "max_tokens": 200, "stream": True, **GREEDY}) as r:
            assert next(r.iter_lines()).startswith("data: ")  # its first token, then the client hangs up
        wait_idle(app.state.server, engine)
        text = c.get("/metrics").text
    samples = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.strip().split("\n")
               if not ln.startswith("#")}
    L = 'model_name="olmoe-1b-7b"'
    gen = sum(r["usage"]["completion_tokens"] for r in (r1, r2, r3))
    prompts = r1["usage"]["prompt_tokens"] + 3 * r2["usage"]["prompt_tokens"] + r3["usage"]["prompt_tokens"]
    assert 1 <= samples[f"moelab:generation_tokens_total{{{L}}}"] - gen < 200  # the aborted stream's tokens
    assert samples[f"moelab:prompt_tokens_total{{{L}}}"] - prompts == len(engine.tokenizer.encode("aborted").ids)
    assert samples[f'moelab:request_success_total{{{L},finished_reason="length"}}'] == 4
    assert samples[f'moelab:request_success_total{{{L},finished_reason="stop"}}'] == 1
    assert samples[f'moelab:request_success_total{{{L},finished_reason="abort"}}'] == 1
    assert samples[f"moelab:http_requests_client_disconnected_total{{{L}}}"] == 1
    assert samples[f"moelab:e2e_request_latency_seconds_count{{{L}}}"] == 5  # finished requests only
    assert samples[f"moelab:time_to_first_token_seconds_count{{{L}}}"] == 6


# ----- the official client -----
def test_openai_client(live: LiveServer) -> None:
    openai = pytest.importorskip("openai")
    oc = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0)
    c = oc.completions.create(model="tiny", prompt="hello", max_tokens=5, temperature=0,
                              extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 5 and c.choices[0].finish_reason == "length"
    ch = oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                    temperature=0, extra_body={"ignore_eos": True})
    assert ch.choices[0].message.role == "assistant" and ch.usage.completion_tokens == 5
    chunks = list(oc.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}], max_tokens=5,
                                             temperature=0, stream=True, stream_options={"include_usage": True},
                                             extra_body={"ignore_eos": True}))
    assert "".join(k.choices[0].delta.content or "" for k in chunks if k.choices) == ch.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == 5
    streamed = "".join(k.choices[0].text for k in oc.completions.create(model="tiny", prompt="hello", max_tokens=5,
                                                                         temperature=0, stream=True,
                                                                         extra_body={"ignore_eos": True}))
    assert streamed == c.choices[0].text
    with pytest.raises(openai.NotFoundError):
        oc.completions.create(model="nope", prompt="x")
    with pytest.raises(openai.BadRequestError):
        oc.completions.create(model="tiny", prompt="x", max_tokens=0)
    assert [m.id for m in oc.models.list()] == ["tiny", "tiny-alias"]
    wait_idle(live.state, live.engine)


# ----- auth (A1-A2) -----
def test_auth_on_every_route_but_health() -> None:
    app = create_app(make_engine(), api_key="sk-test")
    routes = {(r.path, m) for r in app.routes for m in getattr(r, "methods", ()) if m != "HEAD"}
    routes |= {("/v2/completions", "POST"), ("/inference/v1/generate", "POST"), ("/invocations", "POST"),
               ("/docs", "GET"), ("/openapi.json", "GET"), ("//v1/models", "GET"), ("/v1/models", "OPTIONS")}
    assert {("/v1/completions", "POST"), ("/metrics", "GET"), ("/health", "GET")} <= routes
    with TestClient(app) as c:
        for path, method in sorted(routes):
            r = c.request(method, path, json={"prompt": "x", "max_tokens": 1})
            assert (r.status_code == 200) if path == "/health" else (r.status_code == 401), (path, method, r.text)
        for header in ("Bearer wrong", "Basic sk-test", "sk-test", "Bearer SK-TEST", "Bearer"):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 401, header
        for header in ("Bearer sk-test", "bearer sk-test"):
            assert c.get("/v1/models", headers={"Authorization": header}).status_code == 200
        r = c.post("/v1/completions", json={"prompt": "x", "max_tokens": 1},
                   headers={"Authorization": "Bearer sk-test"})
        assert r.status_code == 200
        assert_error(c.get("/v1/models"), 401)


def test_several_api_keys_from_the_cli_or_the_environment(monkeypatch) -> None:
    """A4: any of several keys is accepted (rotation); the CLI takes them as --api-key K1 K2 or MOELAB_API_KEY."""
    import argparse

    from moelab.server import cli

    p = argparse.ArgumentParser()
    cli.add_commands(p.add_subparsers(), argparse.ArgumentParser().add_subparsers())
    a = p.parse_args(["serve", "--api-key", "k1", "m", "--api-key", "k2"])
    assert a.api_key == ["k1", "k2"] and a.model == "m"
    app = create_app(make_engine(), api_key=["k1", "k2"])
    with TestClient(app) as c:
        for key, status in (("k1", 200), ("k2", 200), ("k3", 401)):
            assert c.get("/v1/models", headers={"Authorization": f"Bearer {key}"}).status_code == status
    seen = {}
    monkeypatch.setenv("MOELAB_API_KEY", "from-env")
    monkeypatch.setattr("moelab.server.app.create_app", lambda *a, **k: seen.setdefault("key", a[2]) and 1 / 0)
    monkeypatch.setattr("moelab.engine.llm_engine.LLMEngine", lambda config: type("E", (), {})())
    monkeypatch.setattr("moelab.server.chat_template.load_chat_template", lambda model: (None, None))
    with pytest.raises(ZeroDivisionError):
        cli.cmd_serve(p.parse_args(["serve", "m"]))
    assert seen["key"] == ["from-env"]


# ----- engine death (F1, S5) -----
def test_engine_death_fails_in_flight_requests_and_health() -> None:
    engine = make_engine()
    steps, real_step = count(), engine.step

    def failing_step():
        if next(steps) >= 6:
            raise RuntimeError("injected device failure")
        return real_step()

    engine.step = failing_step
    died = threading.Event()
    app = create_app(engine, on_engine_dead=lambda exc: died.set())

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=30) as ac:
            body = {"prompt": "doomed", "max_tokens": 100, **GREEDY}
            return await asyncio.gather(ac.post("/v1/completions", json={**body, "stream": True}),
                                        ac.post("/v1/completions", json=body))

    streamed, plain = asyncio.run(main())
    events = parse_sse(streamed.text)
    assert "injected device failure" in events[-2]["error"]["message"]
    assert_error(plain, 500, contains="injected device failure")
    assert died.wait(5)
    with TestClient(app) as c:
        assert c.get("/health").status_code == 503
        assert_error(c.post("/v1/completions", json={"prompt": "x"}), 503, contains="engine is dead")


def test_a_tokenizer_failure_is_an_openai_shaped_500_and_the_server_goes_on() -> None:
    """F2: an exception outside the engine (here the tokenizer, for one prompt) is a 500 in OpenAI's error shape,
    not a dropped connection or a traceback in the body; the next request is served."""
    import dataclasses

    engine = make_engine()
    app = create_app(engine)
    state = app.state.server
    tok = state.model.tokenizer

    class Flaky:
        def __getattr__(self, name):
            return getattr(tok, name)

        def encode(self, text, *a, **k):
            if "boom" in text:
                raise RuntimeError("tokenizer exploded")
            return tok.encode(text, *a, **k)

    state.model = dataclasses.replace(state.model, tokenizer=Flaky())
    with TestClient(app, raise_server_exceptions=False) as c:
        err = assert_error(c.post("/v1/completions", json={"prompt": "boom", "max_tokens": 2}), 500,
                           contains="RuntimeError")
        assert "exploded" not in err["message"] and err["type"] == "server_error"
        out = c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 2, **GREEDY}).json()
        assert out["usage"]["completion_tokens"] == 2
    assert state.inflight == 0


def test_hung_engine_step_is_caught_by_the_watchdog() -> None:
    """F6: a step that never returns (a hung kernel) must not leave requests waiting forever behind a /health of
    200. Past watchdog_timeout the engine is declared dead: in-flight requests end with an error, on_engine_dead
    fires (the server exits 1), /health is 503; if the stuck step returns later its tokens go nowhere."""
    engine = make_engine()
    steps, real_step, release = count(), engine.step, threading.Event()
    calls_after_release = []

    def hanging_step():
        if release.is_set():
            calls_after_release.append(1)
        if next(steps) >= 4:
            release.wait(30)
        return real_step()

    engine.step = hanging_step
    died = threading.Event()
    app = create_app(engine, on_engine_dead=lambda exc: died.set(), watchdog_timeout=0.5)
    state = app.state.server

    async def main() -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=30) as ac:
            body = {"prompt": "stuck", "max_tokens": 100, **GREEDY}
            return await asyncio.gather(ac.post("/v1/completions", json={**body, "stream": True}),
                                        ac.post("/v1/completions", json=body))

    t0 = time.monotonic()
    streamed, plain = asyncio.run(main())
    assert time.monotonic() - t0 < 10
    assert "more than 0.5 s" in parse_sse(streamed.text)[-2]["error"]["message"]
    assert_error(plain, 500, contains="more than 0.5 s")
    assert died.wait(5) and state.engine_loop.num_requests == 0

    async def after() -> tuple[httpx.Response, httpx.Response]:  # no lifespan: nothing asks the thread to stop
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=30) as ac:
            return await ac.get("/health"), await ac.post("/v1/completions", json={"prompt": "x"})

    health, refused = asyncio.run(after())
    assert health.status_code == 503 and health.json()["status"] == "dead"
    assert_error(refused, 503, contains="engine is dead")
    release.set()  # the stuck step returns: the engine thread ends there, stepping no more, delivering nothing
    state.engine_loop._thread.join(10)
    assert not state.engine_loop._thread.is_alive() and not calls_after_release
    t0 = time.monotonic()
    state.engine_loop.shutdown()  # does not wait on a dead engine's thread
    assert time.monotonic() - t0 < 1


def test_watchdog_leaves_a_slow_but_moving_engine_alone() -> None:
    engine = make_engine()
    real_step = engine.step

    def slow_step():
        time.sleep(0.05)
        return real_step()

    engine.step = slow_step
    app = create_app(engine, watchdog_timeout=0.5)
    with TestClient(app) as c:
        out = c.post("/v1/completions", json={"prompt": "slow", "max_tokens": 12, **GREEDY}).json()
        assert out["usage"]["completion_tokens"] == 12 and c.get("/health").status_code == 200
    with pytest.raises(ValueError, match="watchdog_timeout"):
        create_app(make_engine(), watchdog_timeout=0)


def test_admission_cap_sheds_load_with_503_and_loses_nothing() -> None:
    """P5: past max_inflight_choices accepted, unfinished engine requests, new ones get 503 + Retry-After (counted
    in http_requests_rejected_total); n > 1 is admitted all or none; a request that can never fit is a 400; the
    admitted ones finish whole and the count returns to 0."""
    engine = make_engine()
    real_step = engine.step
    peak = [0]

    def slow_step():
        time.sleep(0.01)
        peak[0] = max(peak[0], len(engine.requests))
        return real_step()

    engine.step = slow_step
    app = create_app(engine, max_inflight_choices=4)
    state = app.state.server

    async def main() -> list[httpx.Response]:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://t", timeout=60) as ac:
            bodies = [{"prompt": f"load {i}", "max_tokens": 8, **GREEDY} for i in range(9)]
            bodies.append({"prompt": "three", "max_tokens": 8, "n": 3, **GREEDY})
            return await asyncio.gather(*(ac.post("/v1/completions", json=b) for b in bodies))

    rs = asyncio.run(main())
    ok = [r for r in rs if r.status_code == 200]
    shed = [r for r in rs if r.status_code == 503]
    assert len(ok) + len(shed) == len(rs) and ok and shed
    assert all(r.headers["Retry-After"] == "1" and "admission limit" in r.json()["error"]["message"] for r in shed)
    assert all(c["finish_reason"] == "length" for r in ok for c in r.json()["choices"])
    assert all(r.json()["usage"]["completion_tokens"] == 8 * len(r.json()["choices"]) for r in ok)
    assert state.inflight_choices == 0 and state.inflight == 0 and 1 <= peak[0] <= 4
    with TestClient(app) as c:
        assert f'moelab:http_requests_rejected_total{{model_name="olmoe-1b-7b"}} {len(shed)}' in c.get("/metrics").text
        assert_error(c.post("/v1/completions", json={"prompt": "x", "n": 5}), 400, "n")
        assert c.post("/v1/completions", json={"prompt": "x", "max_tokens": 2, "n": 4}).status_code == 200
    with pytest.raises(ValueError, match="max_inflight_choices"):
        create_app(make_engine(), max_inflight_choices=0)


# ----- non-finite logits (F3) -----
def test_non_finite_logits_fail_their_request_only() -> None:
    """A request whose logits turn NaN gets a 500 (an error event then [DONE] when streaming), counted in
    request_errors_total; the engine stays healthy and serves the next request; nothing is left behind."""
    engine = make_engine()
    real, spoil = engine.model.compute_logits, threading.Event()

    def poisoned(hidden):
        out = real(hidden)
        return out.masked_fill(torch.ones_like(out, dtype=torch.bool), float("nan")) if spoil.is_set() else out

    engine.model.compute_logits = poisoned
    app = create_app(engine)
    with TestClient(app) as c:
        ok_before = c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 4, **GREEDY}).json()
        spoil.set()
        disconnects = app.state.server.metrics.disconnected
        streamed = c.post("/v1/completions", json={"prompt": "bad", "max_tokens": 4, "stream": True, **GREEDY})
        events = parse_sse(streamed.text)
        assert "non-finite logits" in events[-2]["error"]["message"] and events[-1] == "[DONE]"
        assert_error(c.post("/v1/completions", json={"prompt": "bad", "max_tokens": 4, "n": 2,
                                                    "temperature": 0.8, "ignore_eos": True}),
                     500, contains="non-finite logits")
        streamed = c.post("/v1/completions", json={"prompt": "bad", "max_tokens": 4, "n": 2, "stream": True,
                                                   "temperature": 0.8, "ignore_eos": True})
        assert "non-finite logits" in parse_sse(streamed.text)[-2]["error"]["message"]
        assert app.state.server.metrics.disconnected == disconnects  # the server ended them, no client left
        spoil.clear()
        assert c.get("/health").status_code == 200
        again = c.post("/v1/completions", json={"prompt": "fine", "max_tokens": 4, **GREEDY}).json()
        assert again["choices"][0]["text"] == ok_before["choices"][0]["text"]
        errors = re.search(r"^moelab:request_errors_total\{[^}]*\} (\d+)$", c.get("/metrics").text, re.M)
        # the stream and the n=2 requests' choices (a second choice may be aborted first, when its request ends)
        assert errors and int(errors.group(1)) == engine.stats()["num_nonfinite"] in (3, 4, 5)
        wait_idle(app.state.server, engine)


# ----- graceful shutdown (G1-G2) -----
def _stream_in_thread(url: str, out: list, max_tokens: int) -> threading.Thread:
    def run() -> None:
        with httpx.Client(base_url=url, timeout=60) as c:
            r = c.post("/v1/completions", json={"prompt": "drain me", "max_tokens": max_tokens, "stream": True,
                                                "stream_options": {"include_usage": True}, **GREEDY})
            out.append(parse_sse(r.text))

    t = threading.Thread(target=run)
    t.start()
    return t


@pytest.mark.parametrize("timeout", [30.0, 0.0])
def test_g1_g2_drain_on_sigterm(timeout: float) -> None:
    srv = LiveServer(make_engine(), shutdown_timeout=timeout)
    results: list = []
    threads = [_stream_in_thread(srv.url, results, 200) for _ in range(4)]
    while srv.state.inflight < 4:
        time.sleep(0.01)
    t0 = time.monotonic()
    srv.server.handle_exit(signal.SIGTERM, None)
    while not srv.state.draining:
        time.sleep(0.01)
    try:
        r = httpx.post(f"{srv.url}/v1/completions", json={"prompt": "late", "max_tokens": 1}, timeout=10)
        assert_error(r, 503, contains="shutting down")
    except httpx.TransportError:
        pass  # the drain already finished and the listener closed: refusing is fine too
    for t in threads:
        t.join(30)
    srv.thread.join(30)
    assert not srv.thread.is_alive() and time.monotonic() - t0 < timeout + 10
    finishes = [stream_text(ev, chat=False)[0]["finish"][0] for ev in results]
    assert len(results) == 4 and set(finishes) == ({"length"} if timeout else {"abort"})
    if timeout:
        assert all(ev[-2]["usage"]["completion_tokens"] == 200 for ev in results)
    wait_idle(srv.state, srv.engine)


def test_g1_a_request_whose_body_is_still_arriving_is_waited_for() -> None:
    """SIGTERM between a request's headers and the end of its body: the drain counts it as in flight (from the
    moment its handler starts), so the rest of the body is read and the request is answered, not cut by uvicorn's
    own shutdown timeout."""
    import socket

    srv = LiveServer(make_engine(), shutdown_timeout=30.0)
    body = json.dumps({"prompt": "late body", "max_tokens": 4, **GREEDY}).encode()
    host, port = srv.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                  b"Content-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n" + body[:10])
        deadline = time.monotonic() + 10
        while srv.state.inflight < 1:
            assert time.monotonic() < deadline, "the handler never counted the request"
            time.sleep(0.01)
        srv.server.handle_exit(signal.SIGTERM, None)
        time.sleep(6.0)  # past uvicorn's timeout_graceful_shutdown (5 s)
        assert srv.thread.is_alive() and srv.state.inflight == 1
        s.sendall(body[10:])
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    head, _, payload = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), reply[:300]
    assert json.loads(payload)["usage"]["completion_tokens"] == 4
    srv.thread.join(30)
    assert not srv.thread.is_alive()
    wait_idle(srv.state, srv.engine)


def test_g1_sigterm_subprocess_exits_cleanly(tmp_path) -> None:
    sock = __import__("socket").socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    cmd = [sys.executable, "-m", "moelab", "serve", "olmoe-1b-7b", "--port", str(port), "--max-model-len", "256",
           "--overrides", '{"layers": 2, "hidden_size": 128, "heads": 4, "kv_heads": 4, "experts": 8, "top_k": 2, '
                          '"moe_intermediate_size": 64, "vocab_size": 512}', "--shutdown-timeout", "20",
           "--disable-uvicorn-access-log", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read().decode()[-2000:]
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.1)
        results: list = []
        t = _stream_in_thread(url, results, 150)
        time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        t.join(30)
        assert proc.wait(30) == 0
        assert stream_text(results[0], chat=False)[0]["finish"] == ["length"]
        assert results[0][-2]["usage"]["completion_tokens"] == 150
    finally:
        if proc.poll() is None:
            proc.kill()


def test_latency_histograms_hold_the_exact_values_in_the_right_buckets() -> None:
    """Each histogram against its definition on known timestamps (binary fractions, exact in floating point):
    TTFT = first token - arrival, queue = first scheduled - arrival, ITL = each gap, TPOT = (last - first) / (n-1),
    E2E = finished - arrival; a value x is in every bucket le >= x (cumulative)."""
    from types import SimpleNamespace

    seq = SimpleNamespace(arrival_time=0.0, first_scheduled_time=0.0625, token_times=[0.25], num_prompt_tokens=7,
                          finish_reason="length", finished_time=0.5)
    m = ServerMetrics("tiny")
    m.on_tokens(seq, 1)
    seq.token_times += [0.28125, 0.34375]
    m.on_tokens(seq, 2)
    m.on_finished(seq)
    text = m.render()
    want = {"time_to_first_token_seconds": [0.25], "request_queue_time_seconds": [0.0625],
            "inter_token_latency_seconds": [0.03125, 0.0625], "request_time_per_output_token_seconds": [0.046875],
            "e2e_request_latency_seconds": [0.5]}
    for name, values in want.items():
        full = f"moelab:{name}"
        assert float(re.search(rf"^{full}_sum\{{[^}}]*\}} (\S+)$", text, re.M).group(1)) == sum(values), name
        assert int(re.search(rf"^{full}_count\{{[^}}]*\}} (\d+)$", text, re.M).group(1)) == len(values), name
        for le, cum in re.findall(rf'^{full}_bucket\{{[^}}]*le="([^"]+)"\}} (\d+)$', text, re.M):
            bound = float("inf") if le == "+Inf" else float(le)
            assert int(cum) == sum(v <= bound for v in values), (name, le)
    assert re.search(r"^moelab:prompt_tokens_total\{[^}]*\} 7$", text, re.M)
    assert re.search(r"^moelab:generation_tokens_total\{[^}]*\} 3$", text, re.M)
