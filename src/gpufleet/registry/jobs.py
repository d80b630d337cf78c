"""Sharded jobs: a job splits its event into shards, the shards run as tasks of their own, and a merge step combines
their results (declared with :func:`gpufleet.functions.job`).

How a job moves, all in the registry:

1. **Split.** The job is a task like any other (its id derives from its event), queued on its own function's
   queue. A worker claims it and runs the split. ``split.lua`` then creates the shards and parks the job in one atomic
   step: a redelivered event finds the job already there, and a split that ran twice (its worker died before
   ``split.lua``) creates the same shards once, since shard ids derive from the job id and the index (``<job>~<i>``).
2. **Shards.** Each shard is a task of the shard function, with its own attempts, backoff, timeout, pool, lease and
   priority (the job's). The job is RUNNING meanwhile but held by no worker: its owner is :data:`WAITING`, which no
   process holds, so no delivery takes it over, and it has no lease to lapse. Each shard that ends counts in the job
   (``FINISH`` and ``FINISH_QUEUED`` call ``shard_done``), and the last one queues the job's final step.
3. **Merge.** A worker of the job's queue claims it again: with every shard SUCCEEDED it runs merge over their
   results (in index order); otherwise the job FAILS and its error names the shards that did not succeed. One
   record for the job goes to its destinations, listing its shards.

Retrying a FAILED job (``retry_job.lua``) runs again only the shards that did not succeed, then merges; a job whose
split never finished runs again from its split. Cancelling a job cancels its shards (queued ones at once, running
ones cooperatively, then killed), and the job ends CANCELLED once they have.

Shards of two jobs interleave by priority, then arrival: each shard is queued with its job's priority when the job
splits, so a job's shards queue behind whatever was queued before them at that level, a later job's at the same
priority behind them, and a job of higher priority goes first. Aging (``defaults.priority_aging_s``) lifts whatever
waits, shards included, so nothing starves.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gpufleet.registry.keyspace import script
from gpufleet.registry.model import State, task_row

if TYPE_CHECKING:
    from gpufleet.functions import Shards
    from gpufleet.registry.model import NewTask
    from gpufleet.registry.store import Registry

# A shard event is JSON of at most this: a reference (an s3:// URI, a byte range, a tile), not the data itself. A
# shard's result too: the merge reads every one of them.
MAX_SHARD_EVENT_BYTES = MAX_SHARD_RESULT_BYTES = 64 * 1024
# What one split may write to Redis, all its shard events together: 1,500 shards of 64 KiB (97 MiB) blocked Redis
# for 746 ms. A split beyond it fails its job (SplitTooLarge): shards pass references, not data.
MAX_SPLIT_BYTES = 16 * 2**20
SHARD_PAGE = 100  # shards a job's view lists by default
SPLIT_PART_BYTES = 2**20  # a split is written to Redis in parts of about this many bytes, one script each
WAITING = "job:waiting-for-shards"  # a parked job's owner token: no process has it (tokens are host/pid/start/nonce)
SHARD_FIELDS = ("state", "attempts", "worker", "started_at", "finished_at", "error", "outputs", "last_error")


def shard_id(job_id: str, index: int) -> str:
    """``<job>~<index>``: ``~`` is in no id a producer may supply, nor in the API's and object events', so a shard id
    never meets another task's."""
    return f"{job_id}~{index}"


@dataclass(frozen=True)
class Shard:
    """One shard as its record stands."""

    index: int
    id: str
    state: str | None  # None: its record is gone (retention passed)
    attempts: int
    worker: str | None
    started_at: float | None
    finished_at: float | None
    error: Any  # a shard that did not succeed: its error (or its latest failed attempt's)
    last_error: Any  # a shard that succeeded after failed attempts: the latest of their errors
    outputs: list[str]

    def view(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "index": self.index,
            "id": self.id,
            "state": self.state,
            "attempts": self.attempts,
            "worker": self.worker,
            "started_at": self.started_at,
            "finished_at": self.finished_at,
        }
        if self.outputs:
            out["outputs"] = self.outputs
        if self.error is not None:
            out["error"] = self.error
        if self.last_error is not None:
            out["last_error"] = self.last_error
        return out


@dataclass(frozen=True)
class JobRecord:
    """What a worker reads of a job before its step: which step (``phase``: ``merge`` once its shards are done), and
    what the split needs to queue the merge later."""

    phase: str
    shards: int
    priority: str
    event: str
    meta: str
    queue: str
    job_started_at: str


class JobStore:
    """A job's registry operations (the scripts above), and its shards as they stand."""

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._split = registry.client.register_script(script("split"))
        self._split_part = registry.client.register_script(script("split_part"))
        self._retry = registry.client.register_script(script("retry_job"))

    def record(self, job_id: str) -> JobRecord:
        """The job's :class:`JobRecord` (empty strings for what its record lacks)."""
        fields = ("phase", "shards", "priority", "event", "meta", "queue", "job_started_at")
        raw: list[bytes | None] = self.registry.client.hmget(self.registry.keys.task(job_id), fields)  # type: ignore[assignment]
        phase, shards, priority, event, meta, queue, started = (v.decode() if v is not None else "" for v in raw)
        return JobRecord(phase, int(shards or 0), priority, event, meta, queue, started)

    def split(self, job_id: str, token: str, shards: list[NewTask], merge_envelope: bytes) -> str:
        """Create the shards, in parts of about :data:`SPLIT_PART_BYTES`, and park the job (see ``split.lua``):
        ``'ok'``, ``'cancelled'`` or ``'lost'``."""
        reg, now, key = self.registry, repr(time.time()), self.registry.keys.task(job_id)
        parts: list[list[int]] = [[]]
        size = 0
        for i, t in enumerate(shards):
            if parts[-1] and size >= SPLIT_PART_BYTES:
                parts.append([])
                size = 0
            parts[-1].append(i)
            size += len(t.message.envelope) + len(t.message.event) + len(t.message.meta)

        def args(part: list[int], *extra: str | bytes) -> list[str | bytes]:
            """A part's script arguments: its batch, ``extra`` (the last part's), then its shards' messages."""
            out: list[str | bytes] = [
                reg.prefix,
                now,
                orjson.dumps([[*task_row(shards[i], now), job_id, str(i)] for i in part]),
                token,
                *extra,
            ]
            for i in part:
                out += (shards[i].message.envelope, shards[i].message.event, shards[i].message.meta)
            return out

        for part in parts[:-1]:
            outcome = self._split_part(keys=[key], args=args(part)).decode()
            if outcome != "ok":
                return str(outcome)
        last = args(parts[-1], merge_envelope, str(len(shards)))
        return str(self._split(keys=[key, reg.keys.leases], args=last).decode())

    def retry(self, job_id: str, envelopes: dict[str, bytes]) -> tuple[str, str]:
        """Run a finished job's unsuccessful shards again, then merge (see ``retry_job.lua``)."""
        args: list[str | bytes] = [self.registry.prefix, repr(time.time())]
        for sid, envelope in envelopes.items():
            args += (sid, envelope)
        outcome, state = self._retry(keys=[self.registry.keys.task(job_id)], args=args)
        return outcome.decode(), state.decode()

    def shards(self, job_id: str, n: int) -> list[Shard]:
        """Each shard of the job, in index order (one round trip)."""
        pipe = self.registry.pipeline()
        for i in range(n):
            pipe.hmget(self.registry.keys.task(shard_id(job_id, i)), SHARD_FIELDS)
        out = []
        for i, row in enumerate(pipe.execute()):
            state, attempts, worker, started, finished, error, outputs, last_error = (
                v.decode() if v is not None else None for v in row
            )
            ok = state == State.SUCCEEDED.value
            problem = None if ok or state is None else (error or last_error)
            retried = last_error if ok and int(attempts or 0) > 1 else None
            out.append(
                Shard(
                    i,
                    shard_id(job_id, i),
                    state,
                    int(attempts or 0),
                    worker or None,
                    float(started) if started else None,
                    float(finished) if finished else None,
                    orjson.loads(problem) if problem else None,
                    orjson.loads(retried) if retried else None,
                    orjson.loads(outputs) if outputs else [],
                )
            )
        return out

    def results(self, job_id: str, n: int) -> list[Any]:
        """The shards' results, in index order (one round trip)."""
        pipe = self.registry.pipeline()
        for i in range(n):
            pipe.hget(self.registry.keys.task(shard_id(job_id, i)), "result")
        return [orjson.loads(r) if r is not None else None for r in pipe.execute()]


def job_info(shards: Shards) -> dict[str, Any]:
    """What ``/v1/functions`` says of a job."""
    return {"shard": shards.function, "max_shards": shards.max_shards, "shard_records": shards.records}


def summary(shards: list[Shard], offset: int = 0, limit: int | None = None) -> dict[str, Any]:
    """``{"total", "done", "progress", "counts": {state: n}, "items": [shards offset .. offset + limit],
    "next_offset"}``: a job's ``shards`` in its status view, its items a page at a time (``next_offset`` None on
    the last page)."""
    counts: dict[str, int] = {}
    for shard in shards:
        key = shard.state or "GONE"
        counts[key] = counts.get(key, 0) + 1
    done = sum(n for state, n in counts.items() if state not in (State.QUEUED.value, State.RUNNING.value))
    total = len(shards)
    end = total if limit is None else min(total, offset + limit)
    return {
        "total": total,
        "done": done,
        "progress": done / total if total else 0.0,
        "counts": counts,
        "items": [s.view() for s in shards[offset:end]],
        "next_offset": end if end < total else None,
    }
