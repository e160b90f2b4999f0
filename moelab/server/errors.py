"""Errors in OpenAI's shape {"error": {"message", "type", "param", "code"}} and the handlers that guarantee it.

Status codes are the contract (the `openai` client maps them to exception classes): 400 bad parameters and
malformed bodies (never FastAPI's 422), 401 missing or wrong API key, 404 unknown model or route, 413 body over
the limit, 500 the engine failed while generating, 503 the engine is dead or the server is shutting down.
Validation messages are bounded (at most MAX_ERRORS errors, no echoed input) so a crafted body cannot amplify.
"""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from moelab.server.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

MAX_ERRORS = 10
MAX_LOC_CHARS = 60
ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 500: "server_error",
               503: "service_unavailable_error"}


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param: str | None = None, code: str | int | None = None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "invalid_request_error"), param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(status: int, message: str, param: str | None = None, code: str | int | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


_TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "null", "bytes"}


def _is_type_tag(part: object) -> bool:
    """A union member's tag in pydantic's error location ("str", "list[int]", "function-after[...]"), which names
    the branch tried, not a field of the request."""
    return isinstance(part, str) and (part in _TYPE_TAGS or ("[" in part and part.endswith("]")))


def _loc(loc: tuple) -> str:
    return ".".join(str(p)[:MAX_LOC_CHARS] for p in loc if not _is_type_tag(p))


def validation_error(errors: list[dict]) -> APIError:
    """A 400 naming at most MAX_ERRORS fields, with pydantic's messages and without the offending input."""
    distinct = list(dict.fromkeys(f"{_loc(e.get('loc', ()))}: {e.get('msg', 'invalid')}" for e in errors))
    shown = distinct[:MAX_ERRORS]
    more = len(distinct) - len(shown)
    message = "; ".join(shown) + (f"; and {more} more error(s)" if more > 0 else "")
    param = _loc(errors[0].get("loc", ())) if errors else None
    return APIError(400, message, param=param or None)


def parse_model(model: type, obj: dict):
    """obj -> model, or a bounded 400."""
    try:
        return model.model_validate(obj)
    except ValidationError as err:
        raise validation_error(err.errors(include_input=False, include_url=False)) from None


def install_handlers(app: FastAPI) -> None:
    async def on_api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(exc.status, exc.message, exc.param, exc.code)

    async def on_validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        err = validation_error(list(exc.errors()))
        return error_response(400, err.message, err.param)

    async def on_http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        if exc.status_code == 404:
            message = f"no route {request.method} {request.url.path}"
        return error_response(exc.status_code, message, headers=getattr(exc, "headers", None))

    async def on_exception(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return error_response(500, f"Internal server error: {type(exc).__name__}")

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation)
    app.add_exception_handler(StarletteHTTPException, on_http)
    app.add_exception_handler(Exception, on_exception)
