"""What changes a task no worker holds: cancel (a queued one at once, a running one by its flag), expire a queued one
past its event age, and run a finished, unsuccessful one again. Each is one atomic script, which refuses a stale read:
the record is read again and the change tried again."""

from __future__ import annotations

import contextlib
import time
from typing import Any

from gpufleet.config import Fleet
from gpufleet.control.views import retried
from gpufleet.delivery.records import Condition, callback_record, fit_record
from gpufleet.errors import ConflictError, NotFoundError
from gpufleet.functions import LATEST
from gpufleet.registry.jobs import JobStore
from gpufleet.registry.messages import Envelopes, queue_version
from gpufleet.registry.model import State
from gpufleet.registry.store import Registry


def stored(registry: Registry, task_id: str, event: bool = False) -> dict[str, Any]:
    """The task's record, or NotFoundError."""
    record = registry.get(task_id, event)
    if record is None:
        raise NotFoundError("task_not_found", f"no task {task_id!r} (unknown, or its record expired)")
    return record


class Changes:
    def __init__(self, fleet: Fleet, registry: Registry, jobs: JobStore, envelopes: Envelopes) -> None:
        self.fleet = fleet
        self.registry = registry
        self.jobs = jobs
        self.envelopes = envelopes

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel: a QUEUED task at once; a RUNNING one is signalled (then killed after the grace period).

        Returns ``{"id", "outcome", "state"}``; outcome ``cancelled``, ``cancelling`` or ``noop`` (already
        finished: not an error).
        """
        outcome, state = self._finish_queued(task_id, "Cancelled", "cancelled while queued")
        if outcome == "cancelled":
            return {"id": task_id, "outcome": "cancelled", "state": State.CANCELLED.value}
        if outcome in ("signalled", "already"):
            self._cancel_shards(task_id)
            return {"id": task_id, "outcome": "cancelling", "state": State.RUNNING.value}
        return {
            "id": task_id,
            "outcome": "noop",
            "state": state,
            "message": f"task already finished ({state}); nothing to cancel",
        }

    def _cancel_shards(self, task_id: str) -> None:
        """A job waiting for its shards (its cancel flag is set): cancel each shard not finished, queued ones at once,
        running ones as any running task. The job ends CANCELLED once they all have (see gpufleet.registry.jobs)."""
        record = self.registry.get(task_id) or {}
        # Parked, all its shards; while it splits, those its parts wrote so far (the next part sees the flag).
        n = int(record.get("shards") or record.get("split_written") or 0)
        for shard in self.jobs.shards(task_id, n):
            if shard.state in (State.QUEUED, State.RUNNING):
                with contextlib.suppress(NotFoundError):
                    self._finish_queued(shard.id, "Cancelled", f"its job {task_id} was cancelled")

    def expire_due(self, limit: int = 100) -> int:
        """Expire the QUEUED tasks whose ``max_event_age_s`` has passed, whether or not any worker serves their
        queue (one that does would expire them when it picks them up). Returns how many expired."""
        expired = 0
        for task_id in self.registry.due_deadlines(limit):
            try:
                outcome, _ = self._finish_queued(task_id, "EventAgeExceeded", "", expire=True)
            except NotFoundError:  # its record expired: only the index entry is left
                self.registry.client.zrem(self.registry.keys.deadlines, task_id)
                continue
            expired += outcome == "expired"
        return expired

    def _finish_queued(self, task_id: str, error_type: str, message: str, expire: bool = False) -> tuple[str, str]:
        """QUEUED -> CANCELLED (or EXPIRED) with its failure record; the record can change between the read and the
        script, which then refuses: read again (both are cheap)."""
        for _ in range(10):
            record = stored(self.registry, task_id, event=True)
            now = time.time()
            if expire:
                waited = now - float(record.get("event_ts") or now)
                message = f"event waited {waited:.1f} s > max_event_age_s {record.get('max_age')}; no worker took it"
            error = {"errorType": error_type, "errorMessage": message, "stackTrace": []}
            event = record.get("event")
            fn = self.fleet.functions.get(record["function"])
            body = callback_record(
                task_id=task_id,
                function=record["function"],
                condition=Condition(error_type),
                attempts=int(record.get("attempts", 0)),
                event=event,
                worker="",
                gpu="",
                started_at=None,
                finished_at=now,
                response=error,
                fleet=self.fleet.settings.redis.key_prefix,
                version=queue_version(record.get("queue") or "") or (fn.version if fn else LATEST),
            )
            outcome, state = self.registry.cancel(
                task_id,
                int(record.get("attempts", 0)),
                error,
                record.get("on_failure", ""),
                fit_record(body, self.fleet.settings.defaults.max_record_bytes),
                fn.retention_s if fn else None,
                expire=expire,
            )
            if outcome == "missing":
                raise NotFoundError("task_not_found", f"no task {task_id!r}")
            if outcome != "conflict":
                return outcome, state
        raise ConflictError("busy", f"task {task_id!r} kept changing state; try again")

    def retry(self, task_id: str) -> dict[str, Any]:
        """Run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task again, from attempt 1, as a new event. A job that had
        split runs again only its shards that did not succeed, then merges."""
        record = self.registry.get(task_id) or {}
        if record.get("parent"):
            raise ConflictError(
                "retry_the_job",
                f"task {task_id!r} is shard {record.get('index')} of job "
                f"{record['parent']!r}: retry the job, which runs again only its shards that did not "
                "succeed, then merges",
            )
        if record.get("shards"):
            return self._retry_job(task_id, int(record["shards"]))
        [call] = self.registry.stored_calls([task_id])
        if call is None:
            raise NotFoundError("task_not_found", f"no task {task_id!r} (unknown, or its record expired)")
        envelope = self.envelopes(task_id, *call)
        if envelope is None:
            raise ConflictError("function_not_served", f"function {call[0]!r} is no longer served")
        return retried(task_id, *self.registry.retry(task_id, envelope), State.QUEUED)

    def _retry_job(self, task_id: str, n: int) -> dict[str, Any]:
        again = [s.id for s in self.jobs.shards(task_id, n) if s.state is not None and s.state != State.SUCCEEDED]
        envelopes = {}
        for sid, call in zip(again, self.registry.stored_calls(again), strict=True):
            envelope = self.envelopes(sid, *call) if call is not None else None
            if envelope is not None:
                envelopes[sid] = envelope
        outcome, state = self.jobs.retry(task_id, envelopes)
        if outcome == "expired":
            raise ConflictError(
                "shards_expired",
                f"shard {state!r} of job {task_id!r} is gone (its retention passed, "
                "or its function is no longer served): the job cannot run it again alone",
            )
        return retried(task_id, outcome, state, State.RUNNING if again else State.QUEUED)  # shards, or its merge
