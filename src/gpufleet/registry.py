"""The task registry in Redis: state, attempts, progress, timestamps, worker and GPU, result or error.

States: QUEUED, RUNNING, SUCCEEDED, FAILED, TIMED_OUT (and CANCELLED, EXPIRED). Every transition is one Lua
script (see :mod:`gpufleet.lua`) with compare-and-set on the state and the owner token, so a task can never run
twice at once nor finish twice. Finishing writes the callback record to a Redis stream in the same script, so a
finished task always has its record, and the dispatcher delivers it later without holding the GPU.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

import orjson
import redis

from gpufleet import lua
from gpufleet.errors import BrokerError
from gpufleet.messages import TaskMessage


class State(StrEnum):
    QUEUED = "QUEUED"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    TIMED_OUT = "TIMED_OUT"
    EXPIRED = "EXPIRED"


TERMINAL = frozenset({State.SUCCEEDED, State.FAILED, State.CANCELLED, State.TIMED_OUT, State.EXPIRED})
REDIS_ERRORS = (redis.ConnectionError, redis.TimeoutError)  # transient: the caller may retry


@dataclass(frozen=True)
class NewTask:
    message: TaskMessage
    on_success: str
    on_failure: str
    max_attempts: int
    source: str
    event_ts: float


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


@dataclass(frozen=True)
class Callback:
    """A record to deliver when a task finishes."""

    dest: str
    value: bytes
    condition: str


class Registry:
    def __init__(self, client: redis.Redis, prefix: str = "gpufleet", retention_s: int = 7 * 86_400) -> None:
        self.client = client
        self.prefix = prefix
        self.retention_s = retention_s
        self.leases_key = f"{prefix}:leases"
        self.delayed_key = f"{prefix}:delayed"
        self.callbacks_key = f"{prefix}:callbacks"
        self._enqueue = client.register_script(lua.ENQUEUE_MANY)
        self._claim = client.register_script(lua.CLAIM)
        self._renew = client.register_script(lua.RENEW)
        self._finish = client.register_script(lua.FINISH)
        self._retry = client.register_script(lua.RETRY_LATER)
        self._housekeep = client.register_script(lua.HOUSEKEEP)

    @classmethod
    def from_url(cls, url: str, prefix: str = "gpufleet", retention_s: int = 7 * 86_400) -> Registry:
        client = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=5, health_check_interval=30)
        return cls(client, prefix, retention_s)

    def task_key(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def enqueue_many(self, tasks: list[NewTask]) -> list[bool]:
        """Create the records and push the messages atomically; False for ids that already exist (duplicates)."""
        if not tasks:
            return []
        now = repr(time.time())
        batch = orjson.dumps([[t.message.task_id, t.message.function, t.message.queue, t.message.envelope.decode(),
                               t.on_success, t.on_failure, str(t.max_attempts), t.source, now, repr(t.event_ts)]
                              for t in tasks])  # fmt: skip
        try:
            result = self._enqueue(args=[self.prefix, now, batch])
        except REDIS_ERRORS as exc:
            raise BrokerError(f"cannot publish tasks to Redis: {exc}") from exc
        return [bool(x) for x in result]

    def get(self, task_id: str) -> dict[str, Any] | None:
        raw: dict[bytes, bytes] = self.client.hgetall(self.task_key(task_id))  # type: ignore[assignment]
        if not raw:
            return None
        return decode_record(raw)

    def claim(self, task_id: str, expect_state: str, expect_token: str, token: str, lease_s: float, worker: str,
              gpu: str) -> Claim:  # fmt: skip
        """Take the task for this process, if its state and owner are still what the caller saw."""
        now = time.time()
        reply = self._claim(
            keys=[self.task_key(task_id), self.leases_key],
            args=[self.prefix, expect_state, expect_token, token, now, now + lease_s, worker, gpu],
        )
        if reply[0] != b"ok":
            return Claim(ok=False, seen_state=reply[1].decode())
        attempts, max_attempts, on_success, on_failure = (v.decode() if v else "" for v in reply[1:5])
        return Claim(True, "RUNNING", int(attempts), int(max_attempts or 1), on_success, on_failure, now)

    def renew(self, task_id: str, token: str, lease_s: float) -> int:
        """Extend the lease. Returns 0 if this process lost the task, 1 if renewed, 2 if a cancel was asked for."""
        return int(self._renew(keys=[self.task_key(task_id), self.leases_key], args=[token, time.time() + lease_s]))

    def finish(self, task_id: str, token: str, state: State, fields: dict[str, Any],
               callbacks: Iterable[Callback]) -> bool:  # fmt: skip
        """RUNNING -> a terminal state, with its callback records. False if this process no longer owns the task."""
        args: list[Any] = [self.prefix, token, state.value, time.time(), self.retention_s, len(fields)]
        for k, v in fields.items():
            args += [k, v if isinstance(v, (str, bytes, int, float)) else orjson.dumps(v)]
        for cb in callbacks:
            args += [cb.dest, cb.value, cb.condition]
        return bool(self._finish(keys=[self.task_key(task_id), self.leases_key, self.callbacks_key], args=args))

    def retry_later(self, task_id: str, token: str, delay_s: float, error: dict[str, Any]) -> bool:
        now = time.time()
        return bool(
            self._retry(
                keys=[self.task_key(task_id), self.leases_key, self.delayed_key],
                args=[self.prefix, token, now + delay_s, orjson.dumps(error), now],
            )
        )

    def set_progress(self, task_id: str, fraction: float, message: str) -> None:
        self.client.hset(self.task_key(task_id), mapping={"progress": fraction, "progress_message": message[:500]})

    def housekeep(self, limit: int = 500) -> tuple[int, int]:
        """Push due retries and re-queue tasks whose lease lapsed. Returns (promoted, reaped)."""
        promoted, reaped = self._housekeep(
            keys=[self.delayed_key, self.leases_key], args=[self.prefix, time.time(), limit]
        )
        return int(promoted), int(reaped)

    def counts(self, function: str) -> dict[str, int]:
        raw: dict[bytes, bytes] = self.client.hgetall(f"{self.prefix}:counts:{function}")  # type: ignore[assignment]
        return {k.decode(): int(v) for k, v in raw.items()}


_NUMERIC = {"attempts", "max_attempts", "progress", "created_at", "queued_at", "started_at", "finished_at",
            "lease_until", "event_ts"}  # fmt: skip
_JSON = {"result", "error", "last_error"}


def decode_record(raw: dict[bytes, bytes]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode()
        if key == "message":
            continue  # the envelope is for re-publishing, not for readers
        if key in _NUMERIC:
            out[key] = float(v) if b"." in v or b"e" in v else int(v)
        elif key in _JSON:
            out[key] = orjson.loads(v) if v else None
        else:
            out[key] = v.decode()
    return out
