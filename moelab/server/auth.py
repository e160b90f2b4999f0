"""API-key check as ASGI middleware, default-deny: every path needs `Authorization: Bearer <key>` except the
explicit allow-list (/health), whatever the method, and whether or not a route exists (so new routes cannot leak,
unlike vLLM's guarded-prefix list). Keys are compared as SHA-256 digests in constant time; the scheme is
case-insensitive, the key is not.
"""

from __future__ import annotations

import hashlib
import secrets

from fastapi.responses import JSONResponse
from starlette.types import ASGIApp, Receive, Scope, Send

from moelab.server.errors import error_body

OPEN_PATHS = frozenset({"/health"})


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class APIKeyMiddleware:
    def __init__(self, app: ASGIApp, api_keys: list[str], open_paths: frozenset[str] = OPEN_PATHS) -> None:
        if not api_keys or not all(api_keys):
            raise ValueError("api_keys must be non-empty strings")
        self.app, self.digests, self.open_paths = app, [_digest(k) for k in api_keys], open_paths

    def authorized(self, header: str | None) -> bool:
        if not header:
            return False
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            return False
        d = _digest(token.strip())
        ok = False
        for k in self.digests:  # no early exit: the time does not depend on which key matched
            ok |= secrets.compare_digest(d, k)
        return ok

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan" or (scope["type"] == "http" and scope["path"] in self.open_paths):
            return await self.app(scope, receive, send)
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        if self.authorized(headers.get("authorization")):
            return await self.app(scope, receive, send)
        if scope["type"] != "http":  # websockets: refuse the handshake
            return await send({"type": "websocket.close", "code": 1008})
        body = error_body(401, "Unauthorized: a valid API key is required (Authorization: Bearer <key>)",
                          code="invalid_api_key")
        await JSONResponse(body, status_code=401, headers={"WWW-Authenticate": "Bearer"})(scope, receive, send)
