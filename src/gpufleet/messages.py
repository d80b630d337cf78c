"""Celery task messages, built directly in kombu's Redis envelope so a trigger can publish a batch in one round trip.

Celery's own ``send_task`` costs one Redis round trip per message. We build the same protocol-2 message and push many
of them with one Lua call that also writes the registry records. The worker side is stock Celery: it cannot tell these
from ``send_task`` messages. The headers are written here, not borrowed from a Celery app, so that a trigger or the API
never builds one (~100 ms, and not thread-safe to import under load); ``tests/test_intake_path.py`` compares them with
what the installed Celery's ``app.amqp.as_task_v2`` writes, so Celery's format stays Celery's.
"""

from __future__ import annotations

import copy
import itertools
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from gpufleet.functions import Function

TASK_NAME = "gpufleet.run"
CONTENT_TYPE = "application/x-gpufleet-orjson"
SERIALIZER = "gpufleet-orjson"


# A task's priority: 0 (lowest) to 9 (highest); higher runs first within a queue. Celery's Redis transport keeps one
# list per level (``priority_steps`` 0..9) and reads them in its own order, where 0 comes first: it gets 9 - ours.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 4
PRIORITY_STEPS = list(range(MAX_PRIORITY + 1))
PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue's name and its level


def queue_name(prefix: str, pool: str, model: str, function: str | None = None) -> str:
    """One queue per function, pool and GPU model: ``gpufleet.default.h100.embed``, ``gpufleet.eu.any.ocr``. So a
    function's queue length and a task's position in it are exact, and a batch forms from one function's tasks.
    Without ``function``: the queue of a pool and model that releases before per-function queues used
    (``gpufleet.default.h100``); workers still read it, so nothing queued before an upgrade is left behind."""
    base = f"{prefix}.{pool}.{model.lower()}"
    return base if function is None else f"{base}.{function}"


def parse_queue(prefix: str, queue: str) -> tuple[str, str, str | None] | None:
    """``gpufleet.eu.h100.embed`` -> ``("eu", "h100", "embed")``; a pool and model queue gives no function; None
    for a name that is not a GPU queue of this fleet."""
    if not queue.startswith(prefix + "."):
        return None
    parts = queue[len(prefix) + 1 :].split(".")
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return (parts[0], parts[1], None) if len(parts) == 2 else None


def function_queue(prefix: str, fn: Function) -> str:
    return queue_name(prefix, fn.gpu.pools[0], fn.gpu.model, fn.name)


def priority_list(queue: str, priority: int) -> str:
    """The Redis list that holds a queue's messages of one priority, named as kombu names it."""
    level = MAX_PRIORITY - priority
    return queue if level == 0 else f"{queue}{PRIORITY_SEP}{level}"


class TaskMessage(NamedTuple):
    """A task ready to publish: its id, the queue and the serialized kombu envelope, plus the event and meta as JSON
    (what the registry keeps, a fraction of the envelope, to build the envelope again when the task is re-queued)."""

    task_id: str
    function: str
    queue: str
    envelope: bytes
    event: bytes
    meta: bytes
    tag: str  # the envelope's delivery tag, which the registry keeps to know the current message from stale copies
    priority: int = DEFAULT_PRIORITY


class MessageFactory:
    """Builds envelopes from a per-function template; only the id and body change per message."""

    def __init__(self, prefix: str, kill_grace_s: float) -> None:
        self._prefix = prefix
        self._kill_grace_s = kill_grace_s
        self._templates: dict[str, dict[str, Any]] = {}
        # kombu only needs delivery tags unique among unacked messages; a counter is 10x cheaper than uuid4.
        self._tags = itertools.count()
        self._tag_prefix = uuid.uuid4().hex[:12]

    def _template(self, fn: Function) -> dict[str, Any]:
        template = self._templates.get(fn.name)
        if template is None:
            headers = task_headers(fn.timeout_s + self._kill_grace_s, fn.timeout_s)
            template = {"headers": headers, "queue": function_queue(self._prefix, fn)}
            self._templates[fn.name] = template
        return template

    def build(self, task_id: str, fn: Function, event: Any, meta: dict[str, Any],
              priority: int = DEFAULT_PRIORITY) -> TaskMessage:  # fmt: skip
        return self.rebuild(task_id, fn, orjson.dumps(event), orjson.dumps(meta), priority)

    def rebuild(self, task_id: str, fn: Function, event: bytes, meta: bytes,
                priority: int = DEFAULT_PRIORITY) -> TaskMessage:  # fmt: skip
        """The task's message from its event and meta as JSON (as the registry stores them). A message pushed again
        by a registry script gets the priority its record holds then (it may have aged), whatever is passed here."""
        template = self._template(fn)
        headers = copy.copy(template["headers"])
        headers["id"] = headers["root_id"] = task_id
        headers["argsrepr"] = "()"
        headers["kwargsrepr"] = f"{{'function': {fn.name!r}}}"
        call = {"function": fn.name, "event": orjson.Fragment(event), "meta": orjson.Fragment(meta)}
        body = orjson.dumps([[], call, _EMBED])
        queue: str = template["queue"]
        tag = f"{self._tag_prefix}-{next(self._tags)}"
        envelope = {  # headers first: the lost-message scan looks for the id near the start
            "headers": headers,
            # The body as JSON text, not base64 (kombu decodes a body only when body_encoding says so): a third
            # smaller, in the queue and in every copy of it.
            "body": body.decode(),
            "content-encoding": "utf-8",
            "content-type": CONTENT_TYPE,
            "properties": {
                "correlation_id": task_id,
                "reply_to": "",
                "delivery_mode": 2,
                "delivery_info": {"exchange": "", "routing_key": queue},
                "priority": MAX_PRIORITY - priority,  # kombu's scale: see PRIORITY_STEPS
                "delivery_tag": tag,
            },
        }
        return TaskMessage(task_id=task_id, function=fn.name, queue=queue, envelope=orjson.dumps(envelope),
                           event=event, meta=meta, tag=tag, priority=priority)  # fmt: skip


def task_headers(time_limit: float, soft_time_limit: float) -> dict[str, Any]:
    """Celery's protocol-2 headers for a ``gpufleet.run`` task, as ``app.amqp.as_task_v2`` writes them (Celery 5.3+):
    no ETA, no expiry, no group or parent; the soft limit at ``timeout_s`` (the handler sees SoftTimeLimitExceeded),
    the hard kill after the grace period. ``id``, ``root_id`` and the reprs are set per task."""
    return {
        "lang": "py",
        "task": TASK_NAME,
        "id": "",
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [time_limit, soft_time_limit],
        "root_id": "",
        "parent_id": None,
        "argsrepr": "()",
        "kwargsrepr": "{}",
        "origin": "gpufleet",
        "ignore_result": True,
        "replaced_task_nesting": 0,
        "stamped_headers": None,
        "stamps": {},
    }


class Envelopes:
    """Builds a stored task's message again (a due retry, a task taken back from a dead worker or a lost message, a
    manual retry) from the registry's function, event and meta. None for a function this fleet does not serve."""

    def __init__(self, factory: MessageFactory, functions: Mapping[str, Function]) -> None:
        self._factory = factory
        self._functions = functions

    def __call__(self, task_id: str, function: str, event: bytes, meta: bytes) -> bytes | None:
        fn = self._functions.get(function)
        return None if fn is None else self._factory.rebuild(task_id, fn, event, meta).envelope


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
