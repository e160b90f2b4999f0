"""Run a prepared request through the EngineLoop and answer it: one JSON body, or an SSE stream.

Stream format (OpenAI's): `data: {json}\\n\\n` per event, `data: [DONE]\\n\\n` last. Chat streams open each choice
with a delta {"role": "assistant", "content": ""}. Each choice has exactly one chunk with a non-null
finish_reason, its last. With stream_options.include_usage one more chunk with "choices": [] and the usage comes
before [DONE] (continuous_usage_stats: usage on every chunk). An engine failure mid-stream sends an error event
{"error": {...}}, then [DONE]; without streaming it is a 500.
Text: streamed deltas come from an IncrementalDetokenizer, holding back the last (longest stop string - 1)
characters, so the concatenated deltas equal the non-streamed text (the engine's final text) exactly.
A client that disconnects (stream or not) aborts its engine requests, which frees their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.types import Receive, Scope, Send

from moelab.engine.detokenizer import IncrementalDetokenizer
from moelab.server.engine_loop import EngineDeadError, EngineRequest, RequestError, Update
from moelab.server.errors import APIError, error_body
from moelab.server.preprocess import Prepared
from moelab.server.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletionChunk,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionChunk,
    CompletionResponse,
    DeltaMessage,
    UsageInfo,
)

logger = logging.getLogger(__name__)
DONE = "data: [DONE]\n\n"


# ----- the two response formats -----
@dataclass
class CompletionFormat:
    id: str
    model: str
    created: int

    def opening(self, n: int) -> list[str]:
        return []

    def chunk(self, index: int, text: str, finish: str | None, stop_reason: Any, usage: UsageInfo | None) -> str:
        c = CompletionChoice(index=index, text=text, finish_reason=finish, stop_reason=stop_reason)
        return _event(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[c], usage=usage))

    def usage_chunk(self, usage: UsageInfo) -> str:
        return _event(CompletionChunk(id=self.id, created=self.created, model=self.model, choices=[], usage=usage))

    def response(self, finals: list[Update], usage: UsageInfo) -> CompletionResponse:
        choices = [CompletionChoice(index=u.index, text=u.text or "", finish_reason=u.finish_reason,
                                    stop_reason=u.stop_reason) for u in finals]
        return CompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices, usage=usage)


@dataclass
class ChatFormat(CompletionFormat):
    def opening(self, n: int) -> list[str]:
        return [self._chunk(i, DeltaMessage(role="assistant", content=""), None, None, None) for i in range(n)]

    def _chunk(self, index: int, delta: DeltaMessage, finish: str | None, stop_reason: Any,
               usage: UsageInfo | None) -> str:
        c = ChatChunkChoice(index=index, delta=delta, finish_reason=finish, stop_reason=stop_reason)
        return _event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[c],
                                          usage=usage))

    def chunk(self, index: int, text: str, finish: str | None, stop_reason: Any, usage: UsageInfo | None) -> str:
        return self._chunk(index, DeltaMessage(content=text if text or finish is None else None), finish,
                           stop_reason, usage)

    def usage_chunk(self, usage: UsageInfo) -> str:
        return _event(ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[],
                                          usage=usage))

    def response(self, finals: list[Update], usage: UsageInfo) -> ChatCompletionResponse:
        choices = [ChatChoice(index=u.index, message=AssistantMessage(content=u.text or ""),
                              finish_reason=u.finish_reason, stop_reason=u.stop_reason) for u in finals]
        return ChatCompletionResponse(id=self.id, created=self.created, model=self.model, choices=choices,
                                      usage=usage)


def make_format(chat: bool, model: str, request_id: str) -> CompletionFormat:
    cls, prefix = (ChatFormat, "chatcmpl-") if chat else (CompletionFormat, "cmpl-")
    return cls(prefix + request_id, model, int(time.time()))


def _event(obj: Any) -> str:
    return f"data: {obj.model_dump_json()}\n\n"


# ----- one streamed choice -----
def final_text(u: Update, include_stop_str: bool, so_far: str = "") -> str:
    """A finished choice's text: the engine's (stop strings cut off), or what was decoded when it was aborted."""
    text = u.text if u.text is not None else so_far
    if include_stop_str and u.finish_reason == "stop" and isinstance(u.stop_reason, str):
        text += u.stop_reason
    return text


class ChoiceText:
    """What one choice has streamed so far, and what it may stream next."""

    def __init__(self, tokenizer: Any, hold: int, hold_tokens: int, include_stop_str: bool) -> None:
        self.detok = IncrementalDetokenizer(tokenizer)
        self.hold, self.hold_tokens, self.include_stop_str = hold, hold_tokens, include_stop_str
        self.sent = ""
        self.num_tokens = 0
        self.finished = False

    def advance(self, u: Update) -> str:
        """Apply an update; return the text to send now (a final update returns the rest of the final text)."""
        self.num_tokens += len(u.token_ids)
        if u.token_ids:
            self.detok.push(u.token_ids)
        if not u.finished:
            if self.num_tokens < self.hold_tokens:
                return ""
            text = self.detok.text
            visible = text[:len(text) - self.hold] if self.hold else text
            delta = visible[len(self.sent):]
            self.sent += delta
            return delta
        self.finished = True
        final = final_text(u, self.include_stop_str, self.detok.text)
        if not final.startswith(self.sent):
            logger.warning("streamed text is not a prefix of the final text; sending no more")
            return ""
        delta, self.sent = final[len(self.sent):], final
        return delta


# ----- the request -----
@dataclass
class Generation:
    """One accepted HTTP request's engine requests, and the cleanup that must run exactly once."""

    engine_loop: Any
    request_ids: list[str]
    queue: asyncio.Queue | None
    on_done: Callable[[bool], None]  # called once with "the client left early"
    finished: set[int]
    closed: bool = False
    failed: bool = False  # the server ended it (an engine error): the choices left are aborted, no client left

    def close(self, disconnected: bool = False) -> None:
        if self.closed:
            return
        self.closed = True
        left = [rid for i, rid in enumerate(self.request_ids) if i not in self.finished]
        self.engine_loop.abort(left)
        self.on_done(disconnected and bool(left) and not self.failed)


class SSEResponse(StreamingResponse):
    """A StreamingResponse whose cleanup runs however the response ends (finished, cancelled, never started)."""

    def __init__(self, content: AsyncIterator[str], generation: Generation, headers: dict[str, str]) -> None:
        super().__init__(content, media_type="text/event-stream", headers=headers)
        self.generation = generation

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.generation.close(disconnected=len(self.generation.finished) < len(self.generation.request_ids))


async def start(engine_loop: Any, prepared: Prepared, base_id: str, arrival: float,
                on_done: Callable[[bool], None]) -> Generation:
    reqs = [EngineRequest(f"{base_id}-{i}", prepared.prompt_of(i), p) for i, p in enumerate(prepared.params)]
    gen = Generation(engine_loop, [r.request_id for r in reqs], None, on_done, set())
    try:
        gen.queue = await engine_loop.add(reqs, arrival)
    except ValueError as err:
        gen.finished.update(range(len(reqs)))
        gen.close()
        raise APIError(400, str(err)) from None
    except EngineDeadError as err:
        gen.finished.update(range(len(reqs)))
        gen.close()
        raise APIError(503, f"the engine is dead: {err}") from None
    except BaseException:
        gen.close(disconnected=True)
        raise
    return gen


def usage_of(prepared: Prepared, completion_tokens: int) -> UsageInfo:
    return UsageInfo.of(sum(len(p) for p in prepared.prompts), completion_tokens)


async def stream_events(gen: Generation, prepared: Prepared, fmt: CompletionFormat, tokenizer: Any,
                        include_usage: bool, continuous_usage: bool) -> AsyncIterator[str]:
    """The SSE events of one request (_events). An exception raised while making them, after the 200 went out,
    still ends the stream as the server's own errors do: an error event in OpenAI's shape, then [DONE]; the
    response's cleanup aborts what is left of the request."""
    try:
        async for event in _events(gen, prepared, fmt, tokenizer, include_usage, continuous_usage):
            yield event
    except Exception as err:
        logger.exception("stream of %s failed", gen.request_ids[0] if gen.request_ids else "?")
        gen.failed = True
        body = error_body(500, f"Internal server error: {type(err).__name__}")
        yield f"data: {json.dumps(body)}\n\n{DONE}"


async def _events(gen: Generation, prepared: Prepared, fmt: CompletionFormat, tokenizer: Any,
                  include_usage: bool, continuous_usage: bool) -> AsyncIterator[str]:
    """Updates that queued up while the client was being served are sent together (one chunk per choice with all
    their text), so a slow event loop sends fewer, larger chunks instead of falling further behind the engine."""
    choices = [ChoiceText(tokenizer, prepared.stop_hold, prepared.hold_tokens, prepared.include_stop_str)
               for _ in prepared.params]
    opening = fmt.opening(len(choices))
    if opening:
        yield "".join(opening)
    num_prompt = sum(len(p) for p in prepared.prompts)
    while len(gen.finished) < len(choices):
        updates = [await gen.queue.get()]
        while not gen.queue.empty():
            updates.append(gen.queue.get_nowait())
        pending: dict[int, list] = {}  # choice -> [text, finish_reason, stop_reason]
        for u in updates:
            if u.error is not None:
                body = error_body(500, _error_message(gen, u, len(choices)))
                yield f"data: {json.dumps(body)}\n\n{DONE}"
                return
            p = pending.setdefault(u.index, ["", None, None])
            p[0] += choices[u.index].advance(u)
            if u.finished:
                gen.finished.add(u.index)
                p[1], p[2] = u.finish_reason, u.stop_reason
        usage = UsageInfo.of(num_prompt, sum(x.num_tokens for x in choices)) if continuous_usage else None
        events = [fmt.chunk(i, text, finish, stop, usage) for i, (text, finish, stop) in pending.items()
                  if text or finish]
        if events:
            yield "".join(events)
    tail = [fmt.usage_chunk(usage_of(prepared, sum(x.num_tokens for x in choices)))] if include_usage else []
    yield "".join([*tail, DONE])


def _error_message(gen: Generation, u: Update, n: int) -> str:
    """The 500's message. A failed request (RequestError) ends its own choice; the other choices of the HTTP
    request are aborted by gen.close(), which counts no client disconnect for them. A dead engine has ended every
    choice."""
    gen.failed = True
    if isinstance(u.error, RequestError):
        gen.finished.add(u.index)
        return f"Internal server error: {u.error}"
    gen.finished.update(range(n))
    return f"Internal server error: the engine failed: {u.error!r}"


async def collect(gen: Generation, n: int, include_stop_str: bool) -> tuple[list[Update], int]:
    """Wait for every choice's final update; (finals in choice order, with their final text; completion tokens)."""
    finals: list[Update | None] = [None] * n
    tokens = 0
    while len(gen.finished) < n:
        u: Update = await gen.queue.get()
        if u.error is not None:
            raise APIError(500, _error_message(gen, u, n))
        tokens += len(u.token_ids)
        if u.finished:
            u.text = final_text(u, include_stop_str)
            finals[u.index] = u
            gen.finished.add(u.index)
    return [u for u in finals if u is not None], tokens


async def wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def respond(request: Request, gen: Generation, prepared: Prepared, fmt: CompletionFormat, tokenizer: Any,
                  stream: bool, stream_options: Any, headers: dict[str, str]) -> Response:
    if stream:
        opts = stream_options
        events = stream_events(gen, prepared, fmt, tokenizer, bool(opts and opts.include_usage),
                               bool(opts and opts.continuous_usage_stats))
        return SSEResponse(events, gen, headers)
    work = asyncio.ensure_future(collect(gen, len(prepared.params), prepared.include_stop_str))
    left = asyncio.ensure_future(wait_disconnect(request))
    try:
        await asyncio.wait({work, left}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        left.cancel()
        gone = not work.done()
        if gone:
            work.cancel()
        gen.close(disconnected=gone)
    if gone:  # the client left; nobody reads this
        return Response(status_code=499)
    finals, tokens = work.result()
    return JSONResponse(fmt.response(finals, usage_of(prepared, tokens)).model_dump(), headers=headers)


def new_request_id(request: Request) -> str:
    """The client's X-Request-Id when it is a short printable token, else a fresh one."""
    rid = request.headers.get("x-request-id", "")
    ok = 0 < len(rid) <= 128 and all(33 <= ord(ch) < 127 for ch in rid)
    return rid if ok else uuid.uuid4().hex
