"""A sharded job's two steps on a worker (see :mod:`gpufleet.registry.jobs`): the split, which creates the shards and
parks the job, and the last step, which merges the shards' results, or fails the job naming the shards that did not
succeed. Each step is one attempt of the job's task, under the job's own timeout, attempts and cancel."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet import trace
from gpufleet.delivery.records import Condition
from gpufleet.errors import EventError, PermanentTaskError, TaskPreempted
from gpufleet.functions import Function
from gpufleet.intake.path import Intake, Producer
from gpufleet.registry.jobs import MAX_SHARD_EVENT_BYTES, MAX_SPLIT_BYTES, JobStore, Shard, shard_id
from gpufleet.registry.messages import DEFAULT_PRIORITY
from gpufleet.registry.model import State
from gpufleet.scheduling.placement import Placer
from gpufleet.worker.attempt import Attempt, Attempts
from gpufleet.worker.context import TaskContext
from gpufleet.worker.item import Item
from gpufleet.worker.outcome import result_json

if TYPE_CHECKING:
    from gpufleet.registry.model import NewTask

log = structlog.get_logger("gpufleet.worker")
JOB_ORIGIN = "job"  # who names shard ids: only a job's split (see gpufleet.intake.ids)


class JobSteps:
    """One per pool process: what it needs to split (an intake for the shards) and to merge."""

    def __init__(self, attempts: Attempts) -> None:
        bundle = attempts.bundle
        self.attempts = attempts
        self.bundle = bundle
        self.store = JobStore(bundle.registry)
        placer = Placer(bundle.registry, bundle.fleet.functions.values(), bundle.fleet.settings.worker.reserve_after_s)
        self.intake = Intake(bundle.fleet, Producer("job", JOB_ORIGIN, MAX_SHARD_EVENT_BYTES), placer)

    def run(self, attempt: Attempt) -> None:
        """The job's step now: its split, or (its shards all done) its merge."""
        item, fn, done = attempt.item, attempt.fn, attempt.done
        job = self.store.record(item.task_id)
        merging = job.phase == "merge"
        listed = self.store.shards(item.task_id, job.shards) if merging else []
        done.shards = [s.view() for s in listed] if merging else None  # in its record, however it ends
        if not attempt.may_start(check_age=not merging):  # the age is the split's to check
            return
        if self.attempts.preempted:  # the notice came between two tasks: this step goes back unstarted
            attempt.preempted()
            return
        with self.attempts.running([attempt], fn):
            if merging and job.job_started_at:  # the job's times, from its split, not the merge step's
                done.started_at = float(job.job_started_at)
            try:
                payload, obj = attempt.payload()
                with attempt.context(obj) as ctx:
                    if merging:
                        self._merge(attempt, ctx, payload, listed)
                    else:
                        merge_envelope = self.bundle.envelopes(
                            item.task_id, fn.name, job.event.encode(), job.meta.encode(), job.queue
                        )
                        assert merge_envelope is not None  # fn is served here
                        self._split(attempt, ctx, payload, int(job.priority or DEFAULT_PRIORITY), merge_envelope)
            except TaskPreempted:  # its host's GPUs are reclaimed: the step runs again elsewhere, no attempt spent
                attempt.preempted()
            except Exception as exc:  # noqa: BLE001 - what split or merge raised is the step's outcome
                attempt.failed(exc)

    def _split(self, attempt: Attempt, ctx: TaskContext, payload: Any, priority: int, merge_envelope: bytes) -> None:
        item, fn = attempt.item, attempt.fn
        events = self.attempts.guarded(fn, lambda: fn.handler(payload, ctx), [attempt.done])
        tasks = self._shards(item, fn, events, priority)
        outcome = self.store.split(item.task_id, item.token, tasks, merge_envelope)
        if outcome == "cancelled":
            attempt.done.cancelled("cancelled before its shards were created")
        elif outcome == "lost":
            attempt.log.warning("job was taken over or finished elsewhere; its shards were not created")
        else:
            attempt.log.info("job split", shards=len(tasks), shard_function=tasks[0].message.function)

    def _shards(self, item: Item, fn: Function, events: Any, priority: int) -> list[NewTask]:
        """The shard tasks of what split returned; a split that cannot be run as shards fails the job for good."""
        assert fn.shards is not None
        limit = fn.shards.max_shards
        if not isinstance(events, list | tuple):
            raise PermanentTaskError(
                "BadSplit", f"job {fn.name!r}: split returned a {type(events).__name__}, not a list of shard events"
            )
        if not events:
            raise PermanentTaskError("BadSplit", f"job {fn.name!r}: split returned no shards")
        if len(events) > limit:
            raise PermanentTaskError(
                "TooManyShards", f"job {fn.name!r}: split returned {len(events)} shards, more than max_shards={limit}"
            )
        shard_fn = self.bundle.fleet.functions[fn.shards.function]
        # What the shards inherit: the trigger's output location (ctx.upload), and their job; not the job's kind of
        # event (an object event's shards are not object events).
        meta = {"job": item.task_id, **({"output": item.meta["output"]} if item.meta.get("output") else {})}
        tasks, written = [], 0
        for i, event in enumerate(events):
            try:
                self.intake.accept(event)
                task = self.intake.task(
                    shard_fn,
                    event,
                    shard_id(item.task_id, i),
                    f"{item.task_id} shard {i}",
                    meta=meta,
                    traceparent=item.meta.get(trace.HEADER),
                    priority=priority,
                )
            except EventError as exc:
                why = str(exc)
                if exc.reason == "oversize":
                    why = (
                        f"its event is {exc.detail.split()[0]} bytes, more than the {MAX_SHARD_EVENT_BYTES} a "
                        "shard event may hold: pass a reference (an s3:// URI and a range)"
                    )
                raise PermanentTaskError("BadShard", f"job {fn.name!r}: shard {i}: {why}") from None
            keep = fn.shards.records
            tasks.append(
                task._replace(
                    on_success=item.claim.on_success if keep else "", on_failure=item.claim.on_failure if keep else ""
                )
            )
            written += len(task.message.event) + len(task.message.envelope)
            if written > MAX_SPLIT_BYTES:
                raise PermanentTaskError(
                    "SplitTooLarge",
                    f"job {fn.name!r}: its {len(events)} shard events hold more "
                    f"than {MAX_SPLIT_BYTES} bytes together: pass references (an s3:// URI and "
                    "a range), not data",
                )
        return tasks

    def _merge(self, attempt: Attempt, ctx: TaskContext, payload: Any, shards: list[Shard]) -> None:
        fn, done = attempt.fn, attempt.done
        assert fn.shards is not None
        assert fn.shards.merge_fn is not None  # checked at load
        n = len(shards)
        bad = [s for s in shards if s.state != State.SUCCEEDED.value]
        if bad:
            message = f"{len(bad)} of {n} shards did not succeed: " + "; ".join(_why(s) for s in bad[:5])
            attempt.log.error("job failed: shards did not succeed", shards=[s.index for s in bad])
            done.finish(
                State.FAILED,
                Condition.RETRIES_EXHAUSTED,
                {
                    "errorType": "ShardsFailed",
                    "errorMessage": message,
                    "stackTrace": [],
                    "shards": [s.index for s in bad],
                },
            )
            return
        merge, results = fn.shards.merge_fn, self.store.results(attempt.item.task_id, n)
        began = time.monotonic()
        value = result_json(fn, self.attempts.guarded(fn, lambda: merge(payload, results, ctx), [done]))
        if attempt.cancel_requested:
            done.cancelled("cancelled while merging; the merge returned early")
            return
        done.succeed(value, ctx.outputs)
        attempt.log.info("job succeeded", shards=n, merge_ms=round((time.monotonic() - began) * 1000, 3))


def _why(shard: Shard) -> str:
    if shard.state is None:
        return f"shard {shard.index} ({shard.id}): its record is gone (retention passed)"
    error = shard.error or {}
    what = f"{error.get('errorType', '')}: {error.get('errorMessage', '')}" if error else "no error recorded"
    return f"shard {shard.index} ({shard.id}) {shard.state} after {shard.attempts} attempt(s): {what}"
