"""Shared by the server tests: a tiny engine, a live uvicorn server on a free port in a thread, SSE parsing, and
the "nothing lost" invariant (I0 of reliability.md)."""

from __future__ import annotations

import json
import threading
import time
from typing import Any

from moelab.engine.config import EngineConfig
from moelab.engine.llm_engine import LLMEngine
from moelab.server.app import create_app
from moelab.server.serve import bind_socket, make_server

TINY = dict(layers=2, hidden_size=128, heads=4, kv_heads=4, experts=8, top_k=2, moe_intermediate_size=64,
            vocab_size=512)
MAX_MODEL_LEN = 256


def make_engine(**kwargs: Any) -> LLMEngine:
    return LLMEngine(EngineConfig(model="olmoe-1b-7b", overrides=TINY, max_model_len=MAX_MODEL_LEN, **kwargs))


class LiveServer:
    """create_app(engine) under uvicorn (DrainingServer) on 127.0.0.1:<free port>, in a daemon thread."""

    def __init__(self, engine: LLMEngine, shutdown_timeout: float = 30.0, **app_kwargs: Any) -> None:
        self.engine = engine
        self.app = create_app(engine, **app_kwargs)
        self.state = self.app.state.server
        self.server = make_server(self.app, shutdown_timeout=shutdown_timeout, log_level="warning", access_log=False)
        sock = bind_socket()
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        self.thread = threading.Thread(target=self.server.run, kwargs=dict(sockets=[sock]), daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            assert time.monotonic() < deadline and self.thread.is_alive(), "the server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def wait_idle(state: Any, engine: LLMEngine, timeout: float = 10.0) -> None:
    """I0: no request in the scheduler, the engine or the loop; every KV block free; no response in flight."""
    deadline = time.monotonic() + timeout
    while True:
        sched = engine.scheduler
        facts = dict(running=len(sched.running), waiting=len(sched.waiting), engine_requests=len(engine.requests),
                     loop_requests=state.engine_loop.num_requests, inflight=state.inflight,
                     used_blocks=engine.block_manager.num_usable_blocks - engine.block_manager.num_free_blocks)
        if not any(facts.values()):
            engine.block_manager.check_invariants([])
            return
        assert time.monotonic() < deadline, f"not idle after {timeout} s: {facts}"
        time.sleep(0.02)


def parse_sse(text: str) -> list[Any]:
    """The events of an SSE body (dicts, and "[DONE]"), checking the framing: `data: <payload>` + blank line."""
    assert text.endswith("\n\n"), text[-200:]
    events = []
    for block in text.split("\n\n")[:-1]:
        assert block.startswith("data: "), block[:200]
        payload = block[len("data: "):]
        events.append(payload if payload == "[DONE]" else json.loads(payload))
    assert events and events[-1] == "[DONE]" and events.count("[DONE]") == 1
    return events


def stream_text(events: list[Any], chat: bool) -> dict[int, dict[str, Any]]:
    """Per choice index: concatenated text, number of content chunks, finish reasons seen (must be one, last)."""
    out: dict[int, dict[str, Any]] = {}
    for e in events[:-1]:
        for c in e.get("choices", []):
            d = out.setdefault(c["index"], {"text": "", "chunks": 0, "finish": [], "after_finish": 0})
            piece = (c["delta"].get("content") if chat else c["text"]) or ""
            if d["finish"]:
                d["after_finish"] += 1
            d["text"] += piece
            d["chunks"] += bool(piece)
            if c["finish_reason"] is not None:
                d["finish"].append(c["finish_reason"])
    for d in out.values():
        assert len(d["finish"]) == 1 and d["after_finish"] == 0, d
    return out
