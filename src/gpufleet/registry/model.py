"""What the task registry stores and answers: a task's states, a new task, a claim, a callback, a stored record.

States: QUEUED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT (and CANCELLED, EXPIRED). :mod:`gpufleet.registry.store`
changes them, one Lua script per transition.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import IntEnum, StrEnum
from typing import Any, NamedTuple

import orjson
import redis

from gpufleet.registry.messages import TaskMessage


class State(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    EXPIRED = "EXPIRED"


# The errorType of a task a worker handed back because its GPU had no room for it (see Gpu.memory_gb): while it is
# QUEUED again, its status says why it waits.
GPU_MEMORY_WAIT = "GpuMemoryWait"
TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.EXPIRED})
_FINISHED = frozenset(state.value for state in TERMINAL)
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)  # transient: the caller may retry


# Builds a stored task's message again: (task id, function, event JSON, meta JSON) -> envelope, or None.
EnvelopeFor = Callable[[str, str, bytes, bytes, str], bytes | None]  # (id, function, event, meta, queue)


class Enqueued(IntEnum):
    """What :meth:`Registry.enqueue_many` did with one task (the values are the script's replies)."""

    CONFLICT = -1  # the id exists for another function or origin: the caller refuses this task
    DUPLICATE = 0  # the id exists for the same function and origin: the same task, delivered again
    CREATED = 1


class NewTask(NamedTuple):  # a tuple: built per message on a trigger's hot path, at half a frozen dataclass's cost
    message: TaskMessage
    on_success: str
    on_failure: str
    max_attempts: int
    source: str
    event_ts: float
    # Who may name this id: "api", "objects" (object events, whatever trigger saw them) or "trigger:<name>".
    # The same id from another origin is a conflict, never a duplicate.
    origin: str
    max_age_s: float | None = None  # the function's max_event_age_s: it expires even if no worker takes it
    overflow: str = ""  # placed outside the function's first pool: "<first pool>US<pool>" (counted once created)


def task_row(t: NewTask, now: str) -> list[str]:
    """A new task's small fields, as ``lua.CREATE`` takes them (the envelope, event and meta travel apart)."""
    return [
        t.message.task_id,
        t.message.function,
        t.message.queue,
        t.on_success,
        t.on_failure,
        str(t.max_attempts),
        t.source,
        now,
        repr(t.event_ts),
        "" if t.max_age_s is None else repr(t.max_age_s),
        t.message.tag,
        t.origin,
        str(t.message.priority),
        t.overflow,
    ]


@dataclass(frozen=True)
class Claim:
    """The outcome of a claim: on success, what the worker needs to finish the task without reading it again."""

    ok: bool
    seen_state: str
    attempts: int = 0
    max_attempts: int = 1
    on_success: str = ""
    on_failure: str = ""
    started_at: float = 0.0
    event_ts: float = 0.0
    cancel_requested: bool = False
    waited_s: float | None = None  # how long it waited in its queue; None: taken over from an owner that died
    queue: str = ""  # the queue it was claimed from: its pool's
    min_room_mb: int = 0  # the room (MiB) a GPU needs for it: more than where it last ran out of memory; 0: any
    gpu_us: int = 0  # the GPU time its earlier runs took (retries, runs out of memory), in microseconds

    @classmethod
    def from_reply(cls, reply: list[Any], now: float) -> Claim:
        """A claim script's answer (see ``claim`` in ``helpers.lua``), made at ``now``."""
        attempts, max_attempts, on_success, on_failure, event_ts, cancel, waited, queue, carry = (
            v.decode() if v else "" for v in reply[1:10]
        )
        gpu_us, _, min_room = carry.partition(" ")  # what its earlier runs left it: "<gpu_us> <min_room>"
        return cls(
            True,
            "RUNNING",
            int(attempts),
            int(max_attempts or 1),
            on_success,
            on_failure,
            now,
            float(event_ts or now),
            cancel == "1",
            float(waited) if waited else None,
            queue,
            int(min_room or 0),
            int(gpu_us or 0),
        )


@dataclass(frozen=True)
class Taken:
    """A task a worker took straight from its queue (:meth:`Registry.pop_claim`): its claim and its call."""

    claim: Claim
    task_id: str
    function: str
    event: Any
    meta: dict[str, Any]


@dataclass(frozen=True)
class Callback:
    """A record to deliver when a task finishes."""

    dest: str
    value: bytes
    condition: str


# What a task's public view shows (control.task_view): a listing reads these and nothing else.
# fmt: skip below: a list of field names reads better packed than one per line.
VIEW_FIELDS = ("function", "state", "attempts", "max_attempts", "priority", "progress", "progress_message",
               "source", "worker", "gpu", "condition", "result", "error", "last_error", "cancel", "queue", "created_at",
               "queued_at", "started_at", "finished_at", "retry_at", "cancel_requested_at", "lease_until",
               "gpu_retries", "used", "checkpoints", "checkpoint_at", "preemptions")  # fmt: skip
VIEW_KEYS = tuple(f.encode() for f in VIEW_FIELDS)
# fmt: skip below: a list of field names reads better packed than one per line.
_NUMERIC = {"attempts", "max_attempts", "progress", "created_at", "queued_at", "started_at", "finished_at",
            "lease_until", "event_ts", "seq", "retry_at", "cancel_requested_at", "manual_retries",
            "max_age", "priority", "prio", "gpu_retries", "checkpoints", "checkpoint_at",
            "preemptions"}  # fmt: skip
_JSON = {"result", "error", "last_error", "outputs"}


def used(gpu_us: int, queue_us: int | None, setup_us: int, peak_mb: int | None, cost: float | None) -> str:
    """What a finished task's run used, as its record keeps it (field ``used``): one short field of numbers, ``-``
    for none (a JSON object would turn a small record's compact encoding into a hash table, and each field more costs
    every later read of the record a step). :func:`usage_of` reads it."""
    parts = [gpu_us, queue_us, setup_us, peak_mb, cost]
    return " ".join("-" if v is None else repr(v) for v in parts)


def usage_of(record: Mapping[str, Any]) -> dict[str, Any] | None:
    """What a finished task's event used: ``gpu_seconds`` (all its runs), ``queue_seconds`` (this run's wait),
    ``setup_seconds`` (the cold start it paid), ``peak_gpu_memory_mb``, and ``cost`` where its GPU model is priced.
    None for a task that has not finished, or finished without a run (expired or cancelled while it waited)."""
    raw = record.get("used")
    if record.get("state") not in _FINISHED or not raw:
        return None
    gpu_us, queue_us, setup_us, peak_mb, cost = (None if v == "-" else v for v in str(raw).split(" "))
    usage: dict[str, Any] = {
        "gpu_seconds": int(gpu_us or 0) / 1e6,
        "queue_seconds": None if queue_us is None else int(queue_us) / 1e6,
        "setup_seconds": None if queue_us is None else int(setup_us or 0) / 1e6,
        "peak_gpu_memory_mb": None if peak_mb is None else int(peak_mb),
    }
    if cost is not None:
        usage["cost"] = float(cost)
    return usage


def decode_record(raw: dict[bytes, bytes], task_id: str, event: bool = False) -> dict[str, Any]:
    """A record as readers see it. Fields a record written at creation leaves out, as they repeat others, are filled
    in: ``id`` (its key's), ``queued_at`` (``created_at``, until it is queued again)."""
    out: dict[str, Any] = {"id": task_id}
    for k, v in raw.items():
        key = k.decode()
        if key in ("event", "meta"):
            if event:  # for the event a callback record quotes; not for readers
                out[key] = orjson.loads(v)
            continue
        if key in _NUMERIC:
            out[key] = float(v) if b"." in v or b"e" in v else int(v)
        elif key in _JSON:
            out[key] = orjson.loads(v) if v else None
        else:
            out[key] = v.decode()
    if "queued_at" not in out and "created_at" in out:
        out["queued_at"] = out["created_at"]
    return out
