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
from gpufleet.triggers.webhook import WebhookTrigger

log = structlog.get_logger("gpufleet.webhook")


def router(webhooks: list[WebhookTrigger], body_timeout_s: float) -> APIRouter:
    """``POST /v1/webhooks/<path>``, one route for every webhook trigger. Not behind the API token: each trigger
    has its own secret.

    Whether to read a body at all is decided from the headers, on every path: the body is read only for a webhook
    path whose Bearer or Basic credentials are right, or whose signed request is plausible (this trigger has an
    HMAC secret, and the signature's form and the timestamp are right, see
    :meth:`WebhookTrigger.signature_plausible`). Then at most that trigger's ``max_payload_bytes`` are read, within
    ``api.body_timeout_s``, and the HMAC is checked over them. Whatever else went wrong, the answer is the same 401.
    """
    hooks = {hook.path: hook for hook in webhooks}
    api = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])

    async def receive(request: Request, path: str) -> JSONResponse:
        hook = hooks.get(path)
        if hook is None:
            return _unauthorized(request, hook)
        if hook.header_authorized(request.headers):
            body = await read_body(request, hook.max_bytes, body_timeout_s)
        elif hook.signature_plausible(request.headers, time.time()):
            body = await read_body(request, hook.max_bytes, body_timeout_s)
            if not hook.signature_authorized(request.headers, body, time.time()):
                return _unauthorized(request, hook)
        else:
            return _unauthorized(request, hook)
        status, answer = await run_in_threadpool(hook.receive, body, request.headers.get("traceparent"))
        return JSONResponse(answer, status_code=status)

    api.add_api_route(
        "/{path:path}",
        receive,
        methods=["POST"],
        name="webhook",
        response_model=None,
        summary="Object notifications for the webhook trigger served at this path",
    )
    return api


def _unauthorized(request: Request, hook: WebhookTrigger | None) -> JSONResponse:
    # The same answer whatever went wrong; only the log tells an unknown path from bad credentials.
    log.warning(
        "webhook call refused",
        trigger=hook.name if hook else None,
        path=request.url.path[:200],
        reason="bad or missing credentials" if hook else "no webhook at this path",
    )
    return error_response(
        401,
        "unauthorized",
        "send the trigger's bearer token or HMAC signature",
        headers={"WWW-Authenticate": 'Bearer, Basic realm="gpufleet"', **CLOSE},
    )
