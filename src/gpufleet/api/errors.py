"""Every error the HTTP API answers is JSON of one shape: ``{"error": {"code": ..., "message": ...}}``.

Codes: ``unauthorized`` (401), ``not_found`` (404, no such route), ``task_not_found`` and ``function_not_found``
(404), ``method_not_allowed`` (405), ``body_timeout`` and ``header_timeout`` (408), ``not_retriable``,
``function_not_served``, ``busy`` and ``id_conflict`` (409), ``payload_too_large`` (413), ``invalid_request`` (422,
with ``details``: the request failed validation), ``invalid_json``, ``schema_mismatch``, ``bad_idempotency_key``,
``bad_limit``, ``bad_state`` and ``bad_cursor`` (422), ``internal`` (500), ``sns_confirm_failed`` (502),
``unavailable`` (503: Redis cannot be reached, or too many requests at once; try again) and
``too_many_connections`` (503: too many connections from one address).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import structlog
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gpufleet.errors import BrokerError, RequestError
from gpufleet.registry.model import REDIS_ERRORS

log = structlog.get_logger("gpufleet.api")

UNAVAILABLE = (BrokerError, *REDIS_ERRORS)
_HTTP_CODES = {401: "unauthorized", 404: "not_found", 405: "method_not_allowed", 413: "payload_too_large"}


class UnauthorizedError(RequestError):
    """No bearer token, or not the right one."""

    status = 401


def error_response(
    status: int,
    code: str,
    message: str,
    *,
    details: list[dict[str, Any]] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    error: dict[str, Any] = {"code": code, "message": message}
    if details is not None:
        error["details"] = details
    return JSONResponse({"error": error}, status_code=status, headers=headers)


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestError, _request_error)  # type: ignore[arg-type]
    app.add_exception_handler(RequestValidationError, _validation_error)  # type: ignore[arg-type]
    app.add_exception_handler(HTTPException, _http_error)  # type: ignore[arg-type]
    for exc_class in UNAVAILABLE:
        app.add_exception_handler(exc_class, _unavailable)


ANSWER_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"cache-control", b"no-store"))  # unless set already

# Answered before the body was read (or all of it): the connection is closed, so the rest is never read either.
CLOSE = {"Connection": "close"}


async def _request_error(request: Request, exc: RequestError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, UnauthorizedError) else {}
    if exc.status in (401, 408, 413):
        headers |= CLOSE
    return error_response(exc.status, exc.code, exc.message, headers=headers)


async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
    # Only where and what: the offending input is left out, so a secret or a huge value is never echoed back.
    details = [{"loc": [str(part) for part in e["loc"]], "msg": e["msg"], "type": e["type"]} for e in exc.errors()]
    message = "; ".join(f"{'.'.join(d['loc'])}: {d['msg']}" for d in details) or "invalid request"
    return error_response(422, "invalid_request", message, details=details)


async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
    code = _HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = "no such route" if exc.status_code == 404 else str(exc.detail)
    return error_response(exc.status_code, code, message, headers=exc.headers)


async def _unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("redis unavailable", path=request.url.path, error=str(exc))
    return error_response(503, "unavailable", "the task registry (Redis) cannot be reached; try again later")


class Observe:
    """Outermost but one: logs each request at debug (uvicorn's access log is off) and turns an unexpected
    exception into a logged 500 ``internal``, so nothing is logged twice and no traceback reaches the client.

    Every answer says ``X-Content-Type-Options: nosniff`` and, unless it set its own, ``Cache-Control: no-store``:
    task results must not stay in a browser's or a proxy's cache."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 0

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                present = {name.lower() for name, _ in message["headers"]}
                extra = [(name, value) for name, value in ANSWER_HEADERS if name not in present]
                message = {**message, "headers": [*message["headers"], *extra]}
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except ClientDisconnect:
            status = 499  # the client left while sending its body: nobody to answer (499 as nginx logs it)
        except Exception:  # the last line of defence: a logged JSON 500, not a dropped connection
            log.exception("unhandled error", method=scope["method"], path=scope["path"])
            if status:
                return  # the response has started; nothing more can be sent
            status = 500
            response = error_response(500, "internal", "internal error; it has been logged")
            await response(scope, receive, send_status)
        finally:
            log.debug(
                "request",
                method=scope["method"],
                path=scope["path"],
                status=status,
                duration_ms=round((time.perf_counter() - start) * 1000, 3),
            )
