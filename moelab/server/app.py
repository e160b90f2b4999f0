"""The OpenAI-compatible FastAPI app around any engine-like object.

Routes: POST /v1/completions, POST /v1/chat/completions, GET /v1/models, GET /health (200, or 503 when the engine
is dead or hung, or the server drains), GET /metrics (Prometheus text). Bodies are read here, not by FastAPI: capped at
max_body_bytes (413, also for chunked bodies), parsed as a JSON object with finite numbers (else 400), then
validated by the pydantic models (400, never 422).

The engine needs: add_request, abort_request, step, has_unfinished_requests, stats, output_text, tokenizer,
max_model_len and spec.vocab_size (moelab.engine.llm_engine.LLMEngine has them; tests may pass a stand-in).
`state.inflight` counts accepted generation requests until their response ended; graceful shutdown
(server/serve.py) sets `state.draining` (new requests get 503) and waits for it to reach 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from moelab.server import generation
from moelab.server.auth import APIKeyMiddleware
from moelab.server.chat_template import DEFAULT as DEFAULT_CHAT_TEMPLATE
from moelab.server.engine_loop import EngineLoop
from moelab.server.errors import APIError, error_response, install_handlers, parse_model
from moelab.server.metrics import PREFIX as METRICS_PREFIX
from moelab.server.metrics import ServerMetrics
from moelab.server.preprocess import ModelContext, check_model, prepare
from moelab.server.protocol import ChatCompletionRequest, CompletionRequest, ModelCard, ModelList

DEFAULT_MAX_BODY_BYTES = 8 << 20


@dataclass
class ServerState:
    engine_loop: EngineLoop
    metrics: ServerMetrics
    model: ModelContext
    root: str
    max_body_bytes: int
    inflight: int = 0
    draining: bool = False
    max_inflight_choices: int | None = None  # admission cap: engine requests (prompts x n) accepted, not yet ended
    inflight_choices: int = 0
    ids: itertools.count = field(default_factory=itertools.count)

    def health(self) -> tuple[int, dict[str, str]]:
        loop = self.engine_loop
        if loop.dead is not None:
            return 503, {"status": "dead", "error": repr(loop.dead)[:500]}
        if loop.watchdog_timeout is not None and loop.step_seconds > loop.watchdog_timeout:
            return 503, {"status": "stalled"}  # the watchdog is about to declare it dead
        if self.draining:
            return 503, {"status": "draining"}
        return 200, {"status": "ok"}


def _finite(text: str) -> float:
    x = float(text)
    if x in (float("inf"), float("-inf")):
        raise ValueError(f"number {text[:40]} is out of range")
    return x


def _no_constants(name: str) -> None:
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> dict[str, Any]:
    """The body as a JSON object: 413 past `limit` bytes (before reading, when Content-Length says so), 400 when it
    is not JSON, not an object, or holds NaN/Infinity."""
    ctype = request.headers.get("content-type")
    if ctype is not None and ctype.split(";")[0].strip().lower() != "application/json":
        raise APIError(400, f"Content-Type must be application/json, got {ctype[:100]!r}")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"the request body has {declared} bytes; the limit is {limit}", code="request_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body exceeds the limit of {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        obj = json.loads(b"".join(chunks), parse_float=_finite, parse_constant=_no_constants)
    except (ValueError, RecursionError) as err:
        raise APIError(400, f"the request body is not valid JSON: {str(err)[:200]}") from None
    if not isinstance(obj, dict):
        raise APIError(400, f"the request body must be a JSON object, got {type(obj).__name__}")
    return obj


def create_app(engine: Any, served_model_names: list[str] | None = None, api_key: str | list[str] | None = None,
               max_body_bytes: int = DEFAULT_MAX_BODY_BYTES, chat_template: str | None = None,
               chat_specials: dict[str, str] | None = None, on_engine_dead: Any = None,
               watchdog_timeout: float | None = None, max_inflight_choices: int | None = None,
               metrics_prefix: str = METRICS_PREFIX) -> FastAPI:
    """The app; `app.state.server` is its ServerState. The engine thread starts with the app (or the first
    request) and stops with the app's lifespan. watchdog_timeout: seconds one engine step may run before the
    engine is declared hung (EngineLoop), None for no watchdog. max_inflight_choices: past this many accepted and
    unfinished engine requests (a request with several prompts or n > 1 counts each choice, admitted all or none),
    new requests get 503 with Retry-After, so a load balancer can shed load instead of queues and TTFT growing
    without bound; None: no cap. metrics_prefix: of every /metrics name ("vllm:" for vLLM's exact names)."""
    if max_inflight_choices is not None and max_inflight_choices < 1:
        raise ValueError(f"max_inflight_choices must be >= 1 (or None: no cap), got {max_inflight_choices}")
    names = tuple(served_model_names or [str(getattr(getattr(engine, "config", None), "model", "moelab"))])
    metrics = ServerMetrics(names[0], prefix=metrics_prefix)
    loop = EngineLoop(engine, metrics, on_engine_dead, watchdog_timeout)
    metrics.stats = lambda: loop.stats
    model = ModelContext(engine.tokenizer, int(engine.spec.vocab_size), int(engine.max_model_len), names,
                         chat_template or DEFAULT_CHAT_TEMPLATE, dict(chat_specials or {}))
    root = str(getattr(getattr(engine, "config", None), "model", names[0]))
    state = ServerState(loop, metrics, model, root, max_body_bytes, max_inflight_choices=max_inflight_choices)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop.start()
        yield
        loop.shutdown()

    app = FastAPI(title="moelab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = state
    install_handlers(app)
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_keys=[api_key] if isinstance(api_key, str) else list(api_key))

    @app.get("/health")
    async def health() -> JSONResponse:
        status, body = state.health()
        return JSONResponse(body, status_code=status)

    @app.get("/metrics")
    async def metrics_route() -> PlainTextResponse:
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        cards = [ModelCard(id=n, root=root, max_model_len=model.max_model_len) for n in names]
        return JSONResponse(ModelList(data=cards).model_dump())

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await _generate(state, request, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        return await _generate(state, request, chat=True)

    return app


async def _generate(state: ServerState, request: Request, chat: bool) -> Response:
    arrival = time.perf_counter()
    if state.engine_loop.dead is not None:
        return error_response(503, f"the engine is dead: {state.engine_loop.dead!r}"[:500])
    if state.draining:
        return error_response(503, "the server is shutting down; retry on another replica",
                              headers={"Retry-After": "1"})
    # In flight from here, while its body still arrives: a drain that begins now waits for it
    state.inflight += 1
    handed_over = False  # once generation.start returned, `done` gives the count back
    try:
        body = await read_json(request, state.max_body_bytes)
        req = parse_model(ChatCompletionRequest if chat else CompletionRequest, body)
        served = check_model(req.model, state.model)
        # tokenizing and templating a long prompt take a while: off the event loop, so other requests and
        # streams go on meanwhile
        prepared = await asyncio.to_thread(prepare, req, state.model)
        choices = len(prepared.params)
        cap = state.max_inflight_choices
        if cap is not None and choices > cap:
            raise APIError(400, f"this request needs {choices} engine requests (prompts x n), more than the "
                                f"server's admission limit of {cap}", param="n")
        if cap is not None and state.inflight_choices + choices > cap:
            state.metrics.on_rejected()
            return error_response(503, f"the server is at its admission limit ({state.inflight_choices} of {cap} "
                                       f"requests in flight; this one needs {choices}); retry later",
                                  headers={"Retry-After": "1"})
        rid = generation.new_request_id(request)
        headers = {"X-Request-Id": rid}
        state.inflight_choices += choices

        def done(disconnected: bool) -> None:
            state.inflight -= 1
            state.inflight_choices -= choices
            if disconnected:
                state.metrics.on_disconnect()

        handed_over = True  # generation.start calls `done` itself when it fails
        gen = await generation.start(state.engine_loop, prepared, f"{rid}-{next(state.ids)}", arrival, done)
    finally:
        if not handed_over:
            state.inflight -= 1
    try:
        fmt = generation.make_format(chat, served, rid)
        return await generation.respond(request, gen, prepared, fmt, state.model.tokenizer, req.stream,
                                        req.stream_options, headers)
    except BaseException:
        gen.close(disconnected=True)
        raise
