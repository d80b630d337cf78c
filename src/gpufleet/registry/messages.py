"""Celery task messages, built directly in kombu's Redis envelope so a trigger can publish a batch in one round trip.

Celery's own ``send_task`` costs one Redis round trip per message. We build the same protocol-2 message and push many
of them with one Lua call that also writes the registry records. The worker side is stock Celery: it cannot tell these
from ``send_task`` messages. The headers are written here, not borrowed from a Celery app, so that a trigger or the API
never builds one (~100 ms, and not thread-safe to import under load); ``tests/integration/test_intake_path.py``
compares them with what the installed Celery's ``app.amqp.as_task_v2`` writes, so Celery's format stays Celery's.
"""

from __future__ import annotations

import itertools
import re
import uuid
from collections.abc import Mapping
from typing import Any, NamedTuple

import orjson

from gpufleet.functions import LATEST, Function

TASK_NAME = "gpufleet.run"
CONTENT_TYPE = "application/x-gpufleet-orjson"
SERIALIZER = "gpufleet-orjson"


# A task's priority: 0 (lowest) to 9 (highest); higher runs first within a queue. Celery's Redis transport keeps one
# list per level (``priority_steps`` 0..9) and reads them in its own order, where 0 comes first: it gets 9 - ours.
MIN_PRIORITY, MAX_PRIORITY, DEFAULT_PRIORITY = 0, 9, 4
PRIORITY_STEPS = list(range(MAX_PRIORITY + 1))
PRIORITY_SEP = "\x06\x16"  # kombu's separator between a queue's name and its level


def queue_name(prefix: str, pool: str, model: str, function: str | None = None, version: str | None = None) -> str:
    """One queue per function, pool and GPU model: ``gpufleet.default.h100.embed``, ``gpufleet.eu.any.ocr``. So a
    function's queue length and a task's position in it are exact, and a batch forms from one function's tasks.
    With ``version``, the queue of that version alone (``gpufleet.eu.h100.embed:4``): only workers whose code declares
    it read it, where every version's workers read the function's own queue.
    Without ``function``: the queue of a pool and model that releases before per-function queues used
    (``gpufleet.default.h100``); workers still read it, so nothing queued before an upgrade is left behind."""
    base = f"{prefix}.{pool}.{model.lower()}"
    if function is None:
        return base
    return f"{base}.{function}" if version is None or version == LATEST else f"{base}.{function}:{version}"


def parse_queue(prefix: str, queue: str) -> tuple[str, str, str | None] | None:
    """``gpufleet.eu.h100.embed`` (or ``...embed:4``, a version's) -> ``("eu", "h100", "embed")``; a pool and model
    queue gives no function; None for a name that is not a GPU queue of this fleet."""
    if not queue.startswith(prefix + "."):
        return None
    parts = queue[len(prefix) + 1 :].split(".", 2)  # a version may hold dots
    if len(parts) == 3:
        return parts[0], parts[1], parts[2].partition(":")[0]
    return (parts[0], parts[1], None) if len(parts) == 2 else None


def queue_version(queue: str) -> str | None:
    """The version a queue is for (``gpufleet.eu.h100.embed:4`` -> ``"4"``), or None for a function's own."""
    _, versioned, version = queue.partition(":")  # no ':' in a prefix, pool, model or function name
    return version if versioned else None


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
    """Builds envelopes from a per-function template: the envelope's bytes around the id, the body, the priority and
    the delivery tag, rendered once from :func:`envelope_layout`. Per message that is one join, a quarter of the
    cost of serialising the envelope again (a trigger builds one per message)."""

    def __init__(self, prefix: str, kill_grace_s: float) -> None:
        self._prefix = prefix
        self._kill_grace_s = kill_grace_s
        self._templates: dict[tuple[str, str | None], _Template] = {}
        # kombu only needs delivery tags unique among unacked messages; a counter is 10x cheaper than uuid4.
        self._tags = itertools.count()
        self._tag_prefix = uuid.uuid4().hex[:12]

    def _template(self, fn: Function, queue: str | None) -> _Template:
        key = (fn.name, queue)
        template = self._templates.get(key)
        if template is None:
            queue = queue or function_queue(self._prefix, fn)
            headers = task_headers(fn.timeout_s + self._kill_grace_s, fn.timeout_s)
            rendered = orjson.dumps(
                envelope_layout(headers, fn.name, _MARK_ID, _MARK_BODY, queue, _MARK_LEVEL, _MARK_TAG)
            )
            marks = [m.group() for m in _MARKS.finditer(rendered)]
            if marks != _MARK_ORDER:  # envelope_layout changed: say so rather than build wrong messages
                raise AssertionError(f"envelope template marks {marks}, expected {_MARK_ORDER}")
            call_head = b'[[],{"function":' + orjson.dumps(fn.name) + b',"event":'
            template = _Template(queue, tuple(_MARKS.split(rendered)), call_head)
            self._templates[key] = template
        return template

    def build(
        self,
        task_id: str,
        fn: Function,
        event: Any,
        meta: dict[str, Any],
        priority: int = DEFAULT_PRIORITY,
        queue: str | None = None,
    ) -> TaskMessage:
        return self.rebuild(task_id, fn, orjson.dumps(event), orjson.dumps(meta), priority, queue)

    def rebuild(
        self,
        task_id: str,
        fn: Function,
        event: bytes,
        meta: bytes,
        priority: int = DEFAULT_PRIORITY,
        queue: str | None = None,
    ) -> TaskMessage:
        """The task's message from its event and meta as JSON (as the registry stores them), for ``queue`` (default:
        the function's first pool's). A message pushed again by a registry script gets the priority its record holds
        then (it may have aged), whatever is passed here."""
        t = self._template(fn, queue)
        tag = f"{self._tag_prefix}-{next(self._tags)}"
        i = orjson.dumps(task_id)
        # The body as JSON text, not base64 (kombu decodes a body only when body_encoding says so): a third smaller,
        # in the queue and in every copy of it.
        body = orjson.dumps(b"".join((t.call_head, event, b',"meta":', meta, _CALL_TAIL)).decode())
        p = t.parts
        envelope = b"".join(
            (p[0], i, p[1], i, p[2], body, p[3], i, p[4], _LEVELS[priority], p[5], orjson.dumps(tag), p[6])
        )
        # Positional: keywords cost twice as much, once per message a trigger takes in.
        return TaskMessage(task_id, fn.name, t.queue, envelope, event, meta, tag, priority)


def envelope_layout(
    headers: dict[str, Any], function: str, task_id: Any, body: Any, queue: str, level: Any, tag: Any
) -> dict[str, Any]:
    """kombu's Redis envelope of a ``gpufleet.run`` task; ``body`` is the call ``[[], {function, event, meta},
    embed]`` as JSON text. The factory renders it once per function with marks in place of the per-message values."""
    headers = {
        **headers,
        "id": task_id,
        "root_id": task_id,
        "argsrepr": "()",
        "kwargsrepr": f"{{'function': {function!r}}}",
    }
    return {  # headers first: the lost-message scan looks for the id near the start
        "headers": headers,
        "body": body,
        "content-encoding": "utf-8",
        "content-type": CONTENT_TYPE,
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": "", "routing_key": queue},
            "priority": level,  # kombu's scale: see PRIORITY_STEPS
            "delivery_tag": tag,
        },
    }


class _Template(NamedTuple):
    queue: str
    parts: tuple[bytes, ...]  # the envelope around (in order) the id, the id, the body, the id, the level, the tag
    call_head: bytes  # the body's JSON up to the event


_MARK_ID, _MARK_BODY, _MARK_TAG, _MARK_LEVEL = "\x01id\x01", "\x01body\x01", "\x01tag\x01", 2_147_483_647
_MARKS = re.compile(rb'"\\u0001id\\u0001"|"\\u0001body\\u0001"|"\\u0001tag\\u0001"|(?<="priority":)2147483647')
_MARK_ORDER = [orjson.dumps(m) for m in (_MARK_ID, _MARK_ID, _MARK_BODY, _MARK_ID, _MARK_LEVEL, _MARK_TAG)]
_CALL_TAIL = b'},{"callbacks":null,"errbacks":null,"chain":null,"chord":null}]'
_LEVELS = [str(MAX_PRIORITY - p).encode() for p in PRIORITY_STEPS]  # our priority -> kombu's level, as JSON


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

    def __call__(self, task_id: str, function: str, event: bytes, meta: bytes, queue: str = "") -> bytes | None:
        fn = self._functions.get(function)
        return None if fn is None else self._factory.rebuild(task_id, fn, event, meta, queue=queue or None).envelope


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
