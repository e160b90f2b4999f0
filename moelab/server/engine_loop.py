"""EngineLoop: the one thread that owns the (not thread-safe) engine; the event loop talks to it through queues.

Commands (add, abort, abort-all, stop) go in through a thread-safe queue and are applied between steps. After
each step the thread snapshots what every request got (new token ids; on finish the reason and final text) as an
`Update` and hands all of them to the event loop in one call_soon_threadsafe, which puts each on its HTTP
request's asyncio queue. Requests of one HTTP call share that queue; an update names its choice index.

Terminal states: every accepted request gets exactly one final update (finished=True): stop/length from the
engine, "abort" after abort()/abort_all(), a RequestError when its logits were not finite (that request alone), or
an error when the engine dies. An exception in step() kills the
engine: in-flight requests get the error, `dead` is set, later adds raise EngineDeadError, on_dead is called.
So does a step that runs longer than watchdog_timeout seconds (a hung device or kernel): a watchdog thread declares
the engine dead with EngineStalledError while the step is still running, so requests end and the server exits
instead of hanging with /health at 200; if the stuck step ever returns, its tokens are dropped.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from moelab.engine.sampling_params import SamplingParams

logger = logging.getLogger(__name__)


class EngineDeadError(RuntimeError):
    pass


class EngineStalledError(EngineDeadError):
    """An engine step ran past the watchdog's timeout."""


class RequestError(RuntimeError):
    """One request failed (its logits were not finite); the engine and the other requests go on."""


@dataclass
class Update:
    index: int  # the choice within its HTTP request
    token_ids: list[int] = field(default_factory=list)  # tokens added by this step
    finished: bool = False
    finish_reason: str | None = None  # "stop" | "length" | "abort"
    stop_reason: int | str | None = None
    text: str | None = None  # the final output text (finished and not aborted)
    error: BaseException | None = None


@dataclass(eq=False)
class RequestStream:
    request_id: str
    index: int
    queue: asyncio.Queue
    loop: asyncio.AbstractEventLoop
    num_prompt_tokens: int


@dataclass
class EngineRequest:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams


class EngineLoop:
    def __init__(self, engine: Any, metrics: Any = None, on_dead: Callable[[BaseException], None] | None = None,
                 watchdog_timeout: float | None = None) -> None:
        if watchdog_timeout is not None and not watchdog_timeout > 0:
            raise ValueError(f"watchdog_timeout must be > 0 seconds (or None: no watchdog), got {watchdog_timeout}")
        self.engine = engine
        self.metrics = metrics
        self.on_dead = on_dead
        self.watchdog_timeout = watchdog_timeout
        self.stats: dict[str, float] = dict(engine.stats())
        self._commands: queue.SimpleQueue = queue.SimpleQueue()
        # engine thread only, except that _die takes them over (under _lock) while a step runs
        self._streams: dict[str, RequestStream] = {}
        self._lock = threading.Lock()
        self._dead: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._step_started: float | None = None  # time.monotonic() when the running step began, else None

    # ----- event-loop side -----
    @property
    def dead(self) -> BaseException | None:
        return self._dead

    @property
    def step_seconds(self) -> float:
        """How long the step now running has run (0 between steps)."""
        started = self._step_started
        return 0.0 if started is None else time.monotonic() - started

    @property
    def num_requests(self) -> int:
        """Requests the engine thread still tracks (0 once everything ended)."""
        return len(self._streams)

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="moelab-engine", daemon=True)
                self._thread.start()
                if self.watchdog_timeout is not None:
                    threading.Thread(target=self._watch, name="moelab-engine-watchdog", daemon=True).start()

    def check_stalled(self) -> bool:
        """Declare the engine dead if its running step has run past watchdog_timeout; True if it did."""
        t = self.watchdog_timeout
        started = self._step_started
        if t is None or started is None or time.monotonic() - started < t:
            return False
        exc = EngineStalledError(f"an engine step has run for more than {t:g} s (watchdog_timeout); the engine is "
                                 f"treated as hung")
        if not self._die(exc, stalled_since=started):
            return False
        logger.error("%s", exc)
        return True

    def _watch(self) -> None:
        interval = min(1.0, self.watchdog_timeout / 4)
        while self._dead is None and self._thread is not None and self._thread.is_alive():
            time.sleep(interval)
            self.check_stalled()

    async def add(self, requests: list[EngineRequest], arrival_time: float) -> asyncio.Queue:
        """Queue all requests (all or none); their updates arrive on the returned queue, choice i = requests[i].
        Raises ValueError when the engine refuses one, EngineDeadError when the engine is dead."""
        self.start()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        out: asyncio.Queue = asyncio.Queue()
        self._submit(("add", requests, arrival_time, out, loop, done))
        try:
            await done
        except asyncio.CancelledError:  # the client left while the engine was adding: undo
            self.abort(r.request_id for r in requests)
            raise
        return out

    def abort(self, request_ids: Iterable[str]) -> None:
        ids = list(request_ids)
        if ids and self._dead is None:
            self._commands.put(("abort", ids))

    def abort_all(self) -> None:
        if self._dead is None:
            self._commands.put(("abort_all",))

    def shutdown(self, timeout: float = 10.0) -> None:
        """Abort what is left, stop the thread (not waited for once the engine is dead: it may be stuck in a
        step the watchdog gave up on)."""
        if self._thread is not None and self._thread.is_alive() and self._dead is None:
            self._commands.put(("stop",))
            self._thread.join(timeout)

    def _submit(self, command: tuple) -> None:
        with self._lock:  # a command is either queued before death (and answered) or refused here
            if self._dead is not None:
                raise EngineDeadError(f"the engine is dead: {self._dead!r}")
            self._commands.put(command)

    # ----- engine thread -----
    def _run(self) -> None:
        engine = self.engine
        try:
            while True:
                if not self._apply_commands(block=not engine.has_unfinished_requests()):
                    return
                if engine.has_unfinished_requests():
                    self.stats = dict(engine.stats())  # what /metrics shows while the step runs
                    with self._lock:
                        self._step_started = time.monotonic()
                    try:
                        out = engine.step()
                    finally:
                        with self._lock:  # the watchdog decides under the same lock, only while a step runs
                            self._step_started = None
                            declared_hung = self._dead is not None
                    if declared_hung:  # its requests have ended already: the step's tokens go nowhere
                        return
                    # the gauges first: a client that got its last token and then scrapes /metrics must not see its
                    # request still running
                    self.stats = dict(engine.stats())
                    self._publish(out)
                    del out  # the last step's sequences are not kept alive while the loop waits for work
                self.stats = dict(engine.stats())
        except BaseException as exc:  # any failure of the engine ends it
            if self._dead is None:
                logger.exception("the engine died")
            else:  # after the watchdog: this is likely what the hang was
                logger.exception("the engine step declared hung has raised")
            self._die(exc)

    def _apply_commands(self, block: bool) -> bool:
        """Apply queued commands (waiting for one when idle); False on stop."""
        try:
            cmd = self._commands.get() if block else self._commands.get_nowait()
        except queue.Empty:
            return True
        while True:
            if cmd[0] == "stop":
                self._abort(list(self._streams))
                return False
            if cmd[0] == "add":
                self._add(*cmd[1:])
            elif cmd[0] == "abort":
                self._abort(cmd[1])
            elif cmd[0] == "abort_all":
                self._abort(list(self._streams))
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _add(self, requests: list[EngineRequest], arrival: float, out: asyncio.Queue,
             loop: asyncio.AbstractEventLoop, done: asyncio.Future) -> None:
        added: list[str] = []
        try:
            for r in requests:
                self.engine.add_request(r.prompt_token_ids, r.params, request_id=r.request_id, arrival_time=arrival)
                added.append(r.request_id)
        except ValueError as err:
            try:
                for rid in added:
                    self.engine.abort_request(rid)
            finally:  # resolved even if a rollback abort raises (the engine then dies)
                _post(loop, _resolve, done, err)
            return
        for i, r in enumerate(requests):
            self._streams[r.request_id] = RequestStream(r.request_id, i, out, loop, len(r.prompt_token_ids))
        _post(loop, _resolve, done, None)

    def _abort(self, request_ids: list[str]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        try:
            for rid in request_ids:
                stream = self._streams.pop(rid, None)
                if stream is None:
                    continue
                aborted = False
                try:
                    aborted = self.engine.abort_request(rid)
                except BaseException:  # e.g. the engine's idle check after the abort: the engine dies, but this
                    aborted = True  # request, no longer among the streams, still gets its final update
                    raise
                finally:
                    if aborted:
                        if self.metrics is not None:
                            self.metrics.on_aborted()
                        batches.setdefault(stream.loop, []).append(
                            (stream.queue, Update(stream.index, finished=True, finish_reason="abort")))
        finally:
            for loop, items in batches.items():
                _post(loop, _deliver, items)

    def _publish(self, outputs: list[tuple[Any, list[int]]]) -> None:
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for seq, new_ids in outputs:
            stream = self._streams.get(seq.request_id)
            if stream is None:
                continue
            u = Update(stream.index, list(new_ids))
            if self.metrics is not None:
                self.metrics.on_tokens(seq, len(new_ids))
            if seq.finished:
                u.finished, u.finish_reason, u.stop_reason = True, seq.finish_reason, seq.stop_reason
                u.text = self.engine.output_text(seq)
                if seq.finish_reason == "error":
                    u.error = RequestError(f"the request failed: {seq.stop_reason}")
                del self._streams[seq.request_id]
                if self.metrics is not None:
                    self.metrics.on_finished(seq)
            batches.setdefault(stream.loop, []).append((stream.queue, u))
        for loop, items in batches.items():
            _post(loop, _deliver, items)

    def _die(self, exc: BaseException, stalled_since: float | None = None) -> bool:
        """End every request with exc and refuse new ones (once; False if already dead). stalled_since (the
        watchdog): only if that step is still the one running."""
        with self._lock:
            if self._dead is not None or (stalled_since is not None and self._step_started != stalled_since):
                return False
            self._dead = exc
            streams = list(self._streams.values())
            self._streams.clear()
        batches: dict[asyncio.AbstractEventLoop, list] = {}
        for s in streams:
            batches.setdefault(s.loop, []).append((s.queue, Update(s.index, finished=True, error=exc)))
        for loop, items in batches.items():
            _post(loop, _deliver, items)
        while True:  # answer the adds that were queued before death
            try:
                cmd = self._commands.get_nowait()
            except queue.Empty:
                break
            if cmd[0] == "add":
                _post(cmd[4], _resolve, cmd[5], EngineDeadError(f"the engine is dead: {exc!r}"))
        if self.on_dead is not None:
            self.on_dead(exc)
        return True


def _post(loop: asyncio.AbstractEventLoop, fn: Callable, *args: Any) -> None:
    try:
        loop.call_soon_threadsafe(fn, *args)
    except RuntimeError:  # the loop is closed: nobody is listening any more
        pass


def _resolve(fut: asyncio.Future, err: BaseException | None) -> None:
    if fut.done():
        return
    if err is None:
        fut.set_result(None)
    else:
        fut.set_exception(err)


def _deliver(items: list[tuple[asyncio.Queue, Update]]) -> None:
    for q, u in items:
        q.put_nowait(u)
