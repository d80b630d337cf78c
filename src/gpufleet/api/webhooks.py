"""HTTP webhook triggers: MinIO and Ceph bucket notifications, and SNS HTTP(S) subscriptions.

A trigger file with ``source: webhook:///minio`` is served by the api role at ``POST /v1/webhooks/minio``.

- **Authentication**, per trigger, checked before anything else (401 and nothing enqueued without it):
  ``Authorization: Bearer <token>`` (MinIO's ``auth_token``), HTTP Basic with the token as the password (for
  SNS: subscribe ``https://gpufleet:<token>@host/v1/webhooks/name``), or ``X-Gpufleet-Signature:
  sha256=<hex HMAC-SHA256 of the body>`` with ``hmac_secret``.
- **Durable before 2xx**: the answer comes after the tasks are in Redis (and dead letters are acknowledged by
  Kafka). If Redis is unreachable for ``PUBLISH_TIMEOUT_S``, it is 503 and the sender retries.
- Bodies over ``max_payload_bytes`` get 413. A body that cannot become tasks (malformed, not S3 events, too many
  records, anything that fails) is dead-lettered with its reason and answered 422 with that reason: never a 5xx,
  which would make the sender retry it in a loop.
- SNS ``SubscriptionConfirmation``: the ``SubscribeURL`` is fetched to confirm, only if its host matches
  ``sns_confirm_hosts`` (AWS's SNS hosts by default), so a forged confirmation cannot make us fetch any URL.
  Redirects are not followed. A fetch that fails (refused, unreachable, not 2xx) is 502 ``sns_confirm_failed``.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import threading
import urllib.request
import uuid
from email.message import Message
from typing import IO, Any
from urllib.parse import urlsplit

import structlog
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from gpufleet.api.errors import error_response
from gpufleet.errors import RequestError
from gpufleet.settings import Fleet, TriggerSettings
from gpufleet.triggers import parse_source
from gpufleet.triggers.base import Ingest, SourceMessage
from gpufleet.triggers.s3events import parse_notification

log = structlog.get_logger("gpufleet.webhook")
PUBLISH_TIMEOUT_S = 10.0
SIGNATURE_HEADER = "X-Gpufleet-Signature"


class WebhookTrigger:
    """One ``webhook:///path`` trigger; :func:`router` serves them all (in the api role, never `gpufleet trigger`)."""

    def __init__(self, fleet: Fleet, trigger: TriggerSettings, ingest: Ingest | None = None) -> None:
        self.name = trigger.name
        self.trigger = trigger
        self.path = parse_source(trigger.source).path.strip("/")
        self.ingest = ingest or Ingest(fleet, trigger)
        self.max_bytes = self.ingest.max_bytes
        self._confirm_hosts = [re.compile(p) for p in trigger.sns_confirm_hosts]

    def authorized(self, headers: Any, body: bytes) -> bool:
        token, secret = self.trigger.token, self.trigger.hmac_secret
        auth = headers.get("authorization", "")
        scheme, _, credentials = auth.partition(" ")
        if token is not None:
            if scheme.lower() == "bearer" and hmac.compare_digest(credentials.strip().encode(), token.encode()):
                return True
            if scheme.lower() == "basic":
                try:
                    _, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
                except (ValueError, UnicodeDecodeError):
                    return False
                if hmac.compare_digest(password.encode(), token.encode()):
                    return True
        if secret is not None:
            expected = "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
            given = headers.get(SIGNATURE_HEADER.lower(), "")
            if hmac.compare_digest(given.encode(), expected.encode()):
                return True
        return False

    def receive(self, body: bytes) -> tuple[int, dict[str, Any]]:
        """Publish what a notification asks for; returns the HTTP status and the counts: 200, or 422 when the body
        was dead-lettered (the sender learns it was refused, and must not send it again). Raises RequestError (503)
        if Redis or Kafka stayed unreachable for PUBLISH_TIMEOUT_S."""
        try:
            note = parse_notification(body, self.trigger.key_encoding, self.trigger.max_records)
        except Exception:  # noqa: BLE001 - Ingest dead-letters it with the reason
            note = None
        if note is not None and note.sns_type == "SubscriptionConfirmation":
            return 200, self._confirm(note.sns or {})
        if note is not None and note.sns_type == "UnsubscribeConfirmation":
            log.info("SNS unsubscribed", trigger=self.name, topic=(note.sns or {}).get("TopicArn"))
            return 200, {"ignored": 1}
        msg_id = str((note.sns or {}).get("MessageId") or uuid.uuid4())[:128] if note else str(uuid.uuid4())
        batch = self.ingest.prepare([SourceMessage(value=body, source_id=f"webhook:{self.path}/{msg_id}",
                                                   default_id=f"webhook-{msg_id}")])  # fmt: skip
        deadline = threading.Event()
        timer = threading.Timer(PUBLISH_TIMEOUT_S, deadline.set)
        timer.start()
        try:
            result = self.ingest.publish(batch, deadline)
        finally:
            timer.cancel()
        if result is None:
            raise _UnavailableError("unavailable", "the task queue cannot be reached; try again later")
        counts = {"published": result.published, "duplicates": result.duplicates,
                  "dead_lettered": result.dead_lettered, "ignored": result.ignored}  # fmt: skip
        if batch.dead:
            headers = batch.dead[0].headers
            error = {"code": headers["reason"], "message": f"dead-lettered: {headers['detail'][:500]}"}
            return 422, {"error": error, **counts}
        return 200, counts

    def _confirm(self, envelope: dict[str, Any]) -> dict[str, Any]:
        url = str(envelope.get("SubscribeURL", ""))
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not any(p.match(parts.hostname or "") for p in self._confirm_hosts):
            log.warning("SNS confirmation refused: host not allowed", trigger=self.name, host=parts.hostname)
            raise RequestError("sns_host_not_allowed", f"SubscribeURL host {parts.hostname!r} is not in "
                               "sns_confirm_hosts")  # fmt: skip
        try:
            with urllib.request.build_opener(_NoRedirect).open(url, timeout=10) as resp:  # scheme and host checked
                resp.read()
        except (OSError, ValueError) as exc:  # URLError, HTTPError (a 3xx too), timeouts; http.client.InvalidURL
            log.warning("SNS confirmation failed", trigger=self.name, host=parts.hostname, error=str(exc))
            raise _ConfirmFailedError("sns_confirm_failed", f"GET SubscribeURL failed: {exc}") from None
        log.info("SNS subscription confirmed", trigger=self.name, topic=envelope.get("TopicArn"))
        return {"confirmed": True}


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """SNS answers a SubscribeURL itself; following a redirect would fetch a host sns_confirm_hosts never allowed."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> None:  # fmt: skip
        return None  # urllib then raises HTTPError for the 3xx


class _UnavailableError(RequestError):
    status = 503


class _ConfirmFailedError(RequestError):
    status = 502


def router(webhooks: list[WebhookTrigger]) -> APIRouter:
    """``POST /v1/webhooks/<path>`` for each webhook trigger. Not behind the API token: each has its own."""
    api = APIRouter(prefix="/v1/webhooks", tags=["webhooks"])
    for hook in webhooks:
        api.add_api_route(f"/{hook.path}", _endpoint(hook), methods=["POST"], name=f"webhook_{hook.name}",
                          summary=f"Object notifications for trigger {hook.name!r}",
                          response_model=None)  # fmt: skip
    return api


def _endpoint(hook: WebhookTrigger) -> Any:
    async def receive(request: Request) -> JSONResponse:
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > hook.max_bytes:
                return error_response(413, "payload_too_large", f"the body exceeds {hook.max_bytes} bytes")
            chunks.append(chunk)
        body = b"".join(chunks)
        if not hook.authorized(request.headers, body):
            log.warning("webhook call refused: bad or missing credentials", trigger=hook.name)
            return error_response(401, "unauthorized", "send the trigger's bearer token or HMAC signature",
                                  headers={"WWW-Authenticate": 'Bearer, Basic realm="gpufleet"'})  # fmt: skip
        from starlette.concurrency import run_in_threadpool

        status, answer = await run_in_threadpool(hook.receive, body)
        return JSONResponse(answer, status_code=status)

    return receive
