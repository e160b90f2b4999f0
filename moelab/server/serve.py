"""Run the app under uvicorn with a graceful drain: the first SIGTERM/SIGINT stops accepting work (new generation
requests get 503 while the listener stays open), waits up to shutdown_timeout seconds for in-flight requests,
aborts what is left (they end with finish_reason "abort"), then exits 0. A second signal exits at once.
If the engine dies the server exits too (status 1), so an orchestrator restarts it.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from types import FrameType
from typing import Any

import uvicorn

from moelab.server.app import ServerState

logger = logging.getLogger(__name__)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState, shutdown_timeout: float) -> None:
        super().__init__(config)
        self.state, self.shutdown_timeout = state, shutdown_timeout
        self.drain_requested = False
        self.exit_code = 0
        self._drain_task: asyncio.Task | None = None

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        if self.drain_requested:  # the second signal: stop now
            self.force_exit = self.should_exit = True
        else:
            logger.info("signal %s: draining for up to %.1f s", signal.Signals(sig).name if sig else sig,
                        self.shutdown_timeout)
            self.drain_requested = True

    def engine_died(self, exc: BaseException) -> None:
        """on_engine_dead callback (called on the engine thread)."""
        logger.error("the engine died (%r); shutting down", exc)
        self.exit_code = 1
        self.should_exit = True

    async def on_tick(self, counter: int) -> bool:
        if self.drain_requested and self._drain_task is None:
            self._drain_task = asyncio.create_task(self.drain())
        return await super().on_tick(counter)

    async def drain(self) -> None:
        state = self.state
        state.draining = True
        deadline = time.monotonic() + self.shutdown_timeout
        while state.inflight and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        if state.inflight:
            logger.warning("shutdown timeout: aborting %d in-flight request(s)", state.inflight)
            state.engine_loop.abort_all()
            grace = time.monotonic() + 5.0
            while state.inflight and time.monotonic() < grace:
                await asyncio.sleep(0.02)
        self.should_exit = True


def make_server(app: Any, host: str = "127.0.0.1", port: int = 8000, shutdown_timeout: float = 30.0,
                log_level: str = "info", access_log: bool = True) -> DrainingServer:
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, access_log=access_log,
                            # the drain (below) has waited for the requests in flight before uvicorn's own
                            # shutdown starts; this is only for connections that still linger then
                            timeout_graceful_shutdown=5, timeout_keep_alive=30)
    server = DrainingServer(config, app.state.server, shutdown_timeout)
    if server.state.engine_loop.on_dead is None:
        server.state.engine_loop.on_dead = server.engine_died
    return server


def bind_socket(host: str = "127.0.0.1", port: int = 0) -> socket.socket:
    """A listening socket (port 0: a free one); pass it to server.run(sockets=[...])."""
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock
