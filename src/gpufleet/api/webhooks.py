"""``POST /v1/webhooks/<path>``: routes each request to its webhook trigger (:mod:`gpufleet.triggers.webhook`).

Credentials are checked before the body is read, and an unknown path answers the same 401 as a bad credential
(see :func:`router`).
"""

from __future__ import annotations

import time

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from gpufleet.api.bodies import read_body
from gpufleet.api.errors import CLOSE, error_response
from gpufleet.triggers.webhook import SIGNATURE_HEADER, WebhookTrigger

log = structlog.get_logger("gpufleet.webhook")


def router(webhooks: list[WebhookTrigger], body_timeout_s: float) -> APIRouter:
    """``POST /v1/webhooks/<path>``, one route for every webhook trigger. Not behind the API token: each trigger
    has its own secret.

    Nothing tells a caller without credentials whether a path exists: an unknown path, a missing and a wrong
    credential get the same 401. The body is only read for a caller whose Bearer or Basic credentials were right,
    or who sent a signature header (an HMAC needs the body): then at most the largest webhook limit is read,
    within ``api.body_timeout_s``, whatever the path.
    """
    hooks = {hook.path: hook for hook in webhooks}
    signed_limit = max(hook.max_bytes for hook in webhooks)
    api = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

    async def receive(request: Request, path: str) -> JSONResponse:
        hook = hooks.get(path)
        if hook is not None and hook.header_authorized(request.headers):
            body = await read_body(request, hook.max_bytes, body_timeout_s)
        elif SIGNATURE_HEADER.lower() in request.headers:
            body = await read_body(request, signed_limit, body_timeout_s)
            if hook is None or not hook.signature_authorized(request.headers, body, time.time()):
                return _unauthorized(request, hook)
            if len(body) > hook.max_bytes:
                return error_response(413, "payload_too_large", f"the body exceeds {hook.max_bytes} bytes",
                                      headers=CLOSE)  # fmt: skip
        else:
            return _unauthorized(request, hook)
        status, answer = await run_in_threadpool(hook.receive, body, request.headers.get("traceparent"))
        return JSONResponse(answer, status_code=status)

    api.add_api_route("/{path:path}", receive, methods=["POST"], name="webhook", response_model=None,
                      summary="Object notifications for the webhook trigger served at this path")  # fmt: skip
    return api


def _unauthorized(request: Request, hook: WebhookTrigger | None) -> JSONResponse:
    # The same answer whatever went wrong; only the log tells an unknown path from bad credentials.
    log.warning("webhook call refused", trigger=hook.name if hook else None, path=request.url.path[:200],
                reason="bad or missing credentials" if hook else "no webhook at this path")  # fmt: skip
    return error_response(401, "unauthorized", "send the trigger's bearer token or HMAC signature",
                          headers={"WWW-Authenticate": 'Bearer, Basic realm="gpufleet"', **CLOSE})  # fmt: skip
