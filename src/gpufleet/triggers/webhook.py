"""HTTP webhook triggers: MinIO and Ceph bucket notifications, and SNS HTTP(S) subscriptions.

A trigger file with ``source: webhook:///minio`` is served by the api role (``served_by``) at ``POST
/v1/webhooks/minio``: :mod:`gpufleet.api.webhooks` routes each request here.

- **Authentication**, per trigger, checked before anything else (401 and nothing enqueued without it):
  ``Authorization: Bearer <token>`` (MinIO's ``auth_token``), HTTP Basic with the token as the password (for
  SNS: subscribe ``https://gpufleet:<token>@host/v1/webhooks/name``), or ``X-Gpufleet-Signature:
  sha256=<hex HMAC-SHA256>`` with ``hmac_secret``, over ``<timestamp>.<body>`` with ``X-Gpufleet-Timestamp`` (see
  :meth:`WebhookTrigger.signature_authorized`). What the headers can show is checked before any of the body is
  read: the credentials for Bearer and Basic, the path, the form of the signature and the timestamp for a signed
  request (see :func:`gpufleet.api.webhooks.router`).
- **Replays.** A signed timestamp is required by default, and accepted within ``hmac_tolerance_s``. A sender that
  cannot sign one (MinIO, Ceph and SNS send a bearer token or Basic credentials) is protected by the task ids
  instead: an object event's id is the object's identity, so a replayed notification is a duplicate for as long as
  the task's record is kept (``retention_s``).
- **Durable before 2xx**: the answer comes after the tasks are in Redis (and dead letters are acknowledged by
  Kafka). If Redis is unreachable for ``PUBLISH_TIMEOUT_S``, it is 503 and the sender retries.
- Bodies over ``max_payload_bytes`` get 413. A body that cannot become tasks (malformed, not S3 events, too many
  records, anything that fails) is dead-lettered with its reason and answered 422 with that reason: never a 5xx,
  which would make the sender retry it in a loop.
- SNS ``SubscriptionConfirmation``: the ``SubscribeURL`` is fetched to confirm (:mod:`gpufleet.triggers.sns_confirm`),
  only over https, only if its whole host matches a pattern of ``sns_confirm_hosts`` (``sns.*.amazonaws.com`` and
  ``sns.*.amazonaws.com.cn`` by default, ``*`` being one DNS label), and only at a public address (IP literals and
  private, loopback or link-local addresses are refused unless ``sns_confirm_private``), so a forged confirmation cannot
  make us fetch any URL. Redirects are not followed and at most 64 KiB of the answer is read. Any failure (refused URL,
  DNS, connection, TLS, not 2xx) is the same 502 ``sns_confirm_failed``; the log says which.
"""

from __future__ import annotations

import base64
import hmac
import re
import threading
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar, Self

import structlog
from pydantic import Field, field_validator

from gpufleet.credentials import HOW_TO_GENERATE, secret_problem, sign
from gpufleet.errors import ConfigError, RequestError
from gpufleet.triggers.base import SourceTrigger
from gpufleet.triggers.ingest import Ingest, SourceMessage
from gpufleet.triggers.options import ObjectEvents, TriggerSettings
from gpufleet.triggers.s3events import parse_notification
from gpufleet.triggers.sns_confirm import SNS_HOSTS, SnsConfirmError, check_host_pattern, confirm_subscription, redact
from gpufleet.urls import Options

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.webhook")
PUBLISH_TIMEOUT_S = 10.0
SIGNATURE_HEADER = "X-Gpufleet-Signature"
TIMESTAMP_HEADER = "X-Gpufleet-Timestamp"
MAX_STAMP_DIGITS = 12
SIGNATURE_FORM = re.compile(r"sha256=[0-9a-f]{64}")


class WebhookSettings(ObjectEvents, TriggerSettings):
    """A webhook's keys: a bearer token (MinIO's auth_token; HTTP Basic with this as the password, for SNS URLs)
    and/or an HMAC-SHA256 secret for the X-Gpufleet-Signature header. ``*_env`` names an environment variable to
    read instead. At least one is required, and it must be strong (weak ones only in the API's dev mode)."""

    token: str | None = None
    token_env: str | None = None
    hmac_secret: str | None = None
    hmac_secret_env: str | None = None
    # A signature covers a timestamp (X-Gpufleet-Timestamp), accepted within this many seconds of now, so a captured
    # request cannot be replayed later. hmac_require_timestamp: false also accepts a signature of the body alone,
    # which can be replayed for ever: only for a sender that cannot sign a timestamp.
    hmac_tolerance_s: int = Field(300, ge=1, le=86_400)
    hmac_require_timestamp: bool = True
    # SubscribeURL hosts we may GET (https only) to confirm a subscription: exact host names, or "*" for exactly
    # one DNS label (see gpufleet.triggers.sns_confirm). sns_confirm_private allows IP literals and private/loopback
    # addresses: for LocalStack or a test fleet; never on an internet-facing fleet.
    sns_confirm_hosts: tuple[str, ...] = SNS_HOSTS
    sns_confirm_private: bool = False

    @field_validator("sns_confirm_hosts")
    @classmethod
    def _sns_confirm_hosts(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(check_host_pattern(p) for p in v)  # ValueError names the entry and how to write it

    def resolved(self, env: Mapping[str, str], *, where: str, weak_secrets_allowed: bool) -> Self:
        secrets: dict[str, Any] = {}
        for key in ("token", "hmac_secret"):
            var = getattr(self, f"{key}_env")
            if var is not None:
                if not env.get(var):
                    raise ConfigError(
                        f"environment variable {var} is not set",
                        file=where,
                        key=f"{key}_env",
                        fix=f"export {var}=... ({HOW_TO_GENERATE})",
                    )
                secrets[key] = env[var]
        hook = self.model_copy(update=secrets) if secrets else self
        for key in ("token", "hmac_secret"):
            value = getattr(hook, key)
            problem = value and secret_problem(value, in_header=key == "token", weak_allowed=weak_secrets_allowed)
            if problem:
                named = f"{key}_env ({getattr(hook, f'{key}_env')})" if key in secrets else key
                raise ConfigError(
                    f"{named} cannot be used: {problem}",
                    file=where,
                    key=named.split(" ")[0],
                    fix=f"{HOW_TO_GENERATE}; weak secrets are only allowed with api.dev: true on a loopback api.host",
                )
        if hook.token is None and hook.hmac_secret is None:
            raise ConfigError(
                "a webhook needs a secret: without one anybody could enqueue GPU work",
                file=where,
                key="token",
                fix="set token/token_env (bearer token) or hmac_secret/hmac_secret_env",
            )
        return hook


class WebhookTrigger(SourceTrigger[WebhookSettings]):
    """One ``webhook:///path`` trigger; :func:`gpufleet.api.webhooks.router` serves them all, in the api role."""

    served_by: ClassVar[str] = "api"  # `gpufleet api` serves it, not `gpufleet trigger`
    Settings = WebhookSettings
    OPTIONS = Options

    def __init__(self, fleet: Fleet, trigger: WebhookSettings, ingest: Ingest | None = None) -> None:
        super().__init__(fleet, trigger, ingest)
        self.path = self.endpoint.path.strip("/")
        self.max_bytes = self.ingest.intake.producer.max_payload_bytes

    def header_authorized(self, headers: Any) -> bool:
        """``Authorization: Bearer <token>``, or Basic with the token as the password: checked before any of the
        body is read."""
        token = self.trigger.token
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if token is None:
            return False
        if scheme.lower() == "bearer":
            return hmac.compare_digest(credentials.strip().encode(), token.encode())
        if scheme.lower() == "basic":
            try:
                _, _, password = base64.b64decode(credentials.strip(), validate=True).decode().partition(":")
            except (ValueError, UnicodeDecodeError):
                return False
            return hmac.compare_digest(password.encode(), token.encode())
        return False

    def signature_plausible(self, headers: Any, now: float) -> bool:
        """What a signed request's headers alone can show, checked before any of its body is read: this trigger
        has an HMAC secret, the signature is ``sha256=`` and 64 hex digits, and the timestamp is present (unless
        ``hmac_require_timestamp: false``) and within ``hmac_tolerance_s`` of now."""
        signature = headers.get(SIGNATURE_HEADER.lower(), "")
        if self.trigger.hmac_secret is None or not SIGNATURE_FORM.fullmatch(signature):
            return False
        stamp = headers.get(TIMESTAMP_HEADER.lower())
        if stamp is None:
            return not self.trigger.hmac_require_timestamp
        # Unix seconds: a dozen digits at most (int() of thousands would raise, and cost a 500).
        return (
            stamp.isascii()
            and stamp.isdigit()
            and len(stamp) <= MAX_STAMP_DIGITS
            and abs(now - int(stamp)) <= self.trigger.hmac_tolerance_s
        )

    def signature_authorized(self, headers: Any, body: bytes, now: float) -> bool:
        """``X-Gpufleet-Signature: sha256=HMAC(secret, "<timestamp>." + body)`` with ``X-Gpufleet-Timestamp: <unix
        seconds>`` (see :meth:`signature_plausible`), or ``HMAC(secret, body)`` where the timestamp is optional."""
        if not self.signature_plausible(headers, now) or self.trigger.hmac_secret is None:
            return False
        expected = sign(self.trigger.hmac_secret, body, headers.get(TIMESTAMP_HEADER.lower()))
        return hmac.compare_digest(headers.get(SIGNATURE_HEADER.lower(), "").encode(), expected.encode())

    def receive(self, body: bytes, traceparent: str | None = None) -> tuple[int, dict[str, Any]]:
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
        trace_header = {"traceparent": traceparent.encode(errors="replace")} if traceparent else {}
        batch = self.ingest.prepare(
            [
                SourceMessage(
                    value=body,
                    source_id=f"webhook:{self.path}/{msg_id}",
                    default_id=f"webhook-{msg_id}",
                    headers=trace_header,
                )
            ]
        )
        deadline = threading.Event()
        timer = threading.Timer(PUBLISH_TIMEOUT_S, deadline.set)
        timer.start()
        try:
            result = self.ingest.publish(batch, deadline)
        finally:
            timer.cancel()
        if result is None:
            raise _UnavailableError("unavailable", "the task queue cannot be reached; try again later")
        counts = {
            "published": result.published,
            "duplicates": result.duplicates,
            "dead_lettered": result.dead_lettered,
            "ignored": result.ignored,
        }
        if batch.dead:
            headers = batch.dead[0].headers
            error = {"code": headers["reason"], "message": f"dead-lettered: {headers['detail'][:500]}"}
            return 422, {"error": error, **counts}
        return 200, counts

    def _confirm(self, envelope: dict[str, Any]) -> dict[str, Any]:
        url = str(envelope.get("SubscribeURL", ""))
        try:
            confirm_subscription(url, self.trigger.sns_confirm_hosts, allow_private=self.trigger.sns_confirm_private)
        except SnsConfirmError as exc:  # the sender learns nothing of why: a probe must not map the network
            log.warning("SNS confirmation failed", trigger=self.name, url=redact(url), cause=exc.cause)
            raise _ConfirmFailedError("sns_confirm_failed", "the SubscribeURL could not be confirmed") from None
        log.info("SNS subscription confirmed", trigger=self.name, topic=envelope.get("TopicArn"))
        return {"confirmed": True}


class _UnavailableError(RequestError):
    status = 503


class _ConfirmFailedError(RequestError):
    """One answer for every failed confirmation, whatever the cause (which only the log tells)."""

    status = 502
