"""Celery task messages, built directly in kombu's Redis envelope so a trigger can publish a batch in one round trip.

Celery's own ``send_task`` costs one Redis round trip per message. We build the same protocol-2 message (headers
from ``app.amqp.as_task_v2``, so Celery's format stays Celery's) and push many of them with one Lua call that also
writes the registry records. The worker side is stock Celery: it cannot tell these from ``send_task`` messages.
"""

from __future__ import annotations

import base64
import copy
import itertools
import uuid
from dataclasses import dataclass
from typing import Any

import orjson

from gpufleet.functions import Function

TASK_NAME = "gpufleet.run"
CONTENT_TYPE = "application/x-gpufleet-orjson"
SERIALIZER = "gpufleet-orjson"


def queue_name(prefix: str, pool: str, model: str) -> str:
    """Queues are named per pool and GPU model: ``gpufleet.default.h100``, ``gpufleet.default.any``."""
    return f"{prefix}.{pool}.{model.lower()}"


def function_queue(prefix: str, fn: Function) -> str:
    return queue_name(prefix, fn.gpu.pools[0], fn.gpu.model)


@dataclass(frozen=True)
class TaskMessage:
    """A task ready to publish: its id, the queue and the serialized kombu envelope."""

    task_id: str
    function: str
    queue: str
    envelope: bytes


class MessageFactory:
    """Builds envelopes from a per-function template; only the id and body change per message."""

    def __init__(self, app: Any, prefix: str, kill_grace_s: float) -> None:
        self._app = app
        self._prefix = prefix
        self._kill_grace_s = kill_grace_s
        self._templates: dict[str, dict[str, Any]] = {}
        # kombu only needs delivery tags unique among unacked messages; a counter is 10x cheaper than uuid4.
        self._tags = itertools.count()
        self._tag_prefix = uuid.uuid4().hex[:12]

    def _template(self, fn: Function) -> dict[str, Any]:
        template = self._templates.get(fn.name)
        if template is None:
            # Soft limit at timeout_s (the handler sees SoftTimeLimitExceeded), hard kill after the grace period.
            msg = self._app.amqp.as_task_v2(
                "0",
                TASK_NAME,
                args=(),
                kwargs={},
                time_limit=fn.timeout_s + self._kill_grace_s,
                soft_time_limit=fn.timeout_s,
                origin="gpufleet",
                ignore_result=True,
            )
            template = {"headers": dict(msg.headers), "queue": function_queue(self._prefix, fn)}
            self._templates[fn.name] = template
        return template

    def build(self, task_id: str, fn: Function, event: Any, meta: dict[str, Any]) -> TaskMessage:
        template = self._template(fn)
        headers = copy.copy(template["headers"])
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"] = "()"
        headers["kwargsrepr"] = f"{{'function': {fn.name!r}}}"
        body = orjson.dumps([[], {"function": fn.name, "event": event, "meta": meta}, _EMBED])
        queue: str = template["queue"]
        envelope = {  # headers first: the lost-message scan looks for the id near the start
            "headers": headers,
            "body": base64.b64encode(body).decode(),
            "content-encoding": "utf-8",
            "content-type": CONTENT_TYPE,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": 0,
                "body_encoding": "base64",
                "delivery_tag": f"{self._tag_prefix}-{next(self._tags)}",
            },
        }
        return TaskMessage(task_id=task_id, function=fn.name, queue=queue, envelope=orjson.dumps(envelope))


def decode_call(envelope: bytes) -> dict[str, Any]:
    """The task's keyword arguments (function, event, meta) from a stored envelope."""
    body = base64.b64decode(orjson.loads(envelope)["body"])
    kwargs: dict[str, Any] = orjson.loads(body)[1]
    return kwargs


_EMBED = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}


def register_serializer() -> None:
    """Register the orjson serializer with kombu (idempotent; called by the app factory, never at import)."""
    from kombu.serialization import register

    register(  # type: ignore[no-untyped-call]
        SERIALIZER,
        lambda obj: orjson.dumps(obj).decode(),
        orjson.loads,
        content_type=CONTENT_TYPE,
        content_encoding="utf-8",
    )
