"""Errors as OpenAI's API gives them: every failure leaves as {"error": {"message", "type", "param", "code"}} with
its status (pydantic's validation errors and malformed JSON as 400s naming the field, Starlette's HTTP errors, the
backend's BackendError, and a bug as a 500 of the same shape), and the request-body size limit (413)."""

from __future__ import annotations

import json
from typing import Any

from fastapi import FastAPI
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from camelid.serve.backend import BackendError

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far above any prompt that fits a context window


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def _error_response(e: BackendError) -> JSONResponse:
    return JSONResponse(error_body(e.message, e.type, e.param, e.code), status_code=e.status)


def _validation_error(exc: RequestValidationError) -> JSONResponse:
    errors = exc.errors()
    first = errors[0] if errors else {"msg": "invalid request", "loc": (), "type": ""}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        return JSONResponse(error_body(f"malformed JSON body: {first.get('msg')}"), status_code=400)
    param = loc[0] if loc else None
    where = ".".join(loc) or "body"
    message = f"{where}: {first.get('msg')}" + (f" (and {len(errors) - 1} more errors)" if len(errors) > 1 else "")
    return JSONResponse(error_body(message, param=param), status_code=400)


_STATUS_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 413: "invalid_request_error", 429: "rate_limit_error"}


def _http_error(exc: StarletteHTTPException) -> JSONResponse:
    kind = _STATUS_TYPES.get(exc.status_code, "invalid_request_error" if exc.status_code < 500 else "server_error")
    return JSONResponse(error_body(str(exc.detail), kind), status_code=exc.status_code)


def add_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, lambda request, exc: _validation_error(exc))
    app.add_exception_handler(StarletteHTTPException, lambda request, exc: _http_error(exc))
    app.add_exception_handler(BackendError, lambda request, exc: _error_response(exc))
    # a bug or a lost database: still OpenAI's error shape (Starlette logs the traceback)
    app.add_exception_handler(Exception, lambda request, exc: JSONResponse(
        error_body(f"internal server error: {type(exc).__name__}", "server_error"), status_code=500))


# ---- the body size limit (a middleware) ------------------------------------------------------------------------

async def _send_json(send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})


class BodyLimit:
    """413 for a request body over max_bytes, whether it declares its length or streams it in chunks."""

    def __init__(self, app, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        too_big = error_body(f"request body is larger than the limit of {self.max_bytes} bytes", param=None,
                             code="request_too_large")
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await _send_json(send, 413, too_big)
        body = bytearray()
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            if len(body) > self.max_bytes:
                return await _send_json(send, 413, too_big)
            if not message.get("more_body", False):
                break
        replayed = False

        async def replay():  # the whole body once, then the real channel (for disconnect detection)
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
