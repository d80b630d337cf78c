"""Dynamic batching: one handler call for several tasks of one function, each keeping its own outcome.

A batch forms from tasks already queued for the function (:func:`gather`): the one that started it, then as many as
its queues hold, up to ``max_size``, each claimed as any task is (its own attempt, lease and cancel flag). A lone task
runs at once, alone. A batch that is not full waits for more only while they keep arriving: it asks again every
``POLL_S`` and stops at the first answer that brings nothing new, or at ``max_wait_ms``.

Each event keeps its own task (:func:`settle`):

- the handler returns one result per event, in order; an exception object in place of a result fails that event alone
  (retried under the function's policy, like any failed task);
- a call that raises, or runs past the soft time limit (``timeout_s``, which applies to each call), is split in two
  halves, each called again, down to single events: one bad or hanging event fails (or times out) alone and its
  neighbours succeed, in the same attempt (at most ``2n - 1`` calls for ``n`` events);
- a call whose process dies (out of memory, a crash) or is killed past the hard time limit gives its events back, and
  an event on a later attempt always runs alone: the one that killed the process does it again alone, and its
  neighbours succeed. Each death counts as an attempt for every event of the call, as for any task (Lambda counts a
  crash too), so with ``max_attempts=1`` it fails them all (``WorkerLost``);
- an event cancelled while the batch runs ends CANCELLED whatever the handler returned for it. One that ignores the
  cancel for ``cancel_grace_s`` is recorded CANCELLED then, and its neighbours run on (the process is not killed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson
import structlog

from gpufleet.errors import PermanentTaskError
from gpufleet.jobs import MAX_SHARD_RESULT_BYTES
from gpufleet.worker.context import TaskContext

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from gpufleet.functions import Function
    from gpufleet.worker.item import Item
    from gpufleet.worker.outcome import Finisher
    from gpufleet.worker.runtime import Runtime

log = structlog.get_logger("gpufleet.worker")
POLL_S = 0.002


class BatchContext:
    """The ``ctx`` of a batch handler: one :class:`TaskContext` per event (``items``), in the order of the events."""

    def __init__(self, items: list[TaskContext], function: str, worker: str, gpu: str, state: Any) -> None:
        self.items = items
        self.function = function
        self.worker = worker
        self.gpu = gpu
        self.state = state
        self.log: FilteringBoundLogger = log.bind(function=function, batch=len(items))

    def progress(self, fraction: float, message: str = "") -> None:
        for item in self.items:
            item.progress(fraction, message)

    @property
    def cancelled(self) -> bool:
        return all(item.cancelled for item in self.items)


@dataclass
class Member:
    """One event of a batch, ready to run: its claim and finisher, and the payload the handler gets."""

    item: Item
    done: Finisher
    payload: Any
    obj: Any  # the object event, completed, for an object task


def gather(rt: Runtime, first: Item, fn: Function) -> list[Item]:
    """The first task, then more of ``fn``'s queued tasks, as described in the module docstring."""
    assert fn.batch is not None
    items = [first]
    if first.claim.attempts > 1:  # its last call may have died with its process: alone (module docstring)
        return items
    queues = rt.function_queues(fn.name)
    formed = time.monotonic()
    while queues and len(items) < fn.batch.max_size and not rt.slot.stopping:  # stopping: take nothing more
        got = rt.take(queues, fn.batch.max_size - len(items), first.token)
        items += got
        left = fn.batch.max_wait_ms / 1000 - (time.monotonic() - formed)
        if not got or left <= 0:  # a lone task (nothing more queued) runs at once
            break
        time.sleep(min(POLL_S, left))
    return items


def calls(members: list[Member]) -> list[list[Member]]:
    """The calls a batch makes: the events on their first attempt together, then each one on a later attempt alone."""
    first = [m for m in members if m.item.claim.attempts == 1]
    return ([first] if first else []) + [[m] for m in members if m.item.claim.attempts > 1]


def settle(rt: Runtime, fn: Function, members: list[Member], failed: Callable[[Member, BaseException], None],
           waiting: list[Member]) -> None:  # fmt: skip
    """Call the handler for ``members`` and record each one's outcome; split and call again when the call raises or
    times out. ``waiting``: the batch's events that wait for a later call (on the watchdog's page meanwhile)."""
    if not members:
        return
    kill_grace = rt.fleet.settings.worker.kill_grace_s
    rt.slot.arm([(m.item.task_id, m.item.token) for m in members], time.time() + fn.timeout_s + kill_grace,
                [(m.item.task_id, m.item.token) for m in waiting])  # fmt: skip
    try:
        results = rt.guarded(fn, lambda: _call(rt, fn, members))
    except Exception as exc:  # noqa: BLE001 - whatever the handler raised, or its time limit; SystemExit goes on up
        if len(members) == 1:
            failed(members[0], exc)
            return
        half = len(members) // 2
        log.warning("batch call failed; trying its halves", function=fn.name, size=len(members), error=repr(exc))
        settle(rt, fn, members[:half], failed, members[half:] + waiting)
        settle(rt, fn, members[half:], failed, waiting)
        return
    for m, result in zip(members, results, strict=True):
        if rt.lease.cancel_requested(m.item.task_id):
            m.done.cancelled("cancelled while running; the batch ran on")
        elif isinstance(result, BaseException):
            m.done.handled = True  # returned, not raised: Lambda's "Handled" function error
            failed(m, result)
        else:
            try:
                m.done.succeed(to_json(fn, result, "job" in m.item.meta), m.done.outputs)
            except PermanentTaskError as exc:
                failed(m, exc)


def _call(rt: Runtime, fn: Function, members: list[Member]) -> list[Any]:
    contexts = [TaskContext(rt, m.item.task_id, fn.name, m.item.claim.attempts, rt.state_of(fn), m.item.meta, m.obj)
                for m in members]  # fmt: skip
    try:
        results = fn.handler([m.payload for m in members], BatchContext(contexts, fn.name, rt.worker_name, rt.gpu,
                                                                        rt.state_of(fn)))  # fmt: skip
    finally:
        for m, ctx in zip(members, contexts, strict=True):
            m.done.outputs = ctx.outputs
            ctx.close()
    if not isinstance(results, list | tuple) or len(results) != len(members):
        got = f"{len(results)} results" if isinstance(results, list | tuple) else f"a {type(results).__name__}"
        raise PermanentTaskError("BadBatchResult", f"batch function {fn.name!r} returned {got} for {len(members)} "
                                 "events; return a list with one result per event, in order")  # fmt: skip
    return list(results)


def to_json(fn: Function, result: Any, shard: bool = False) -> bytes:
    """A result as stored JSON; one that cannot be (or a shard's over :data:`MAX_SHARD_RESULT_BYTES`: its job's merge
    reads them all) is a PermanentTaskError (every attempt would give it)."""
    if hasattr(result, "model_dump"):
        result = result.model_dump(mode="json")
    try:
        value = orjson.dumps(result, option=orjson.OPT_SERIALIZE_NUMPY)
    except TypeError as exc:
        what = f"function {fn.name!r} returned a {type(result).__name__} that cannot be stored as JSON: {exc}"
        raise PermanentTaskError("ResultNotSerializable", what) from None
    if shard and len(value) > MAX_SHARD_RESULT_BYTES:
        raise PermanentTaskError("ShardResultTooLarge", f"function {fn.name!r} returned {len(value)} bytes for a "
                                 f"shard, more than {MAX_SHARD_RESULT_BYTES}: upload it (ctx.upload) and return its "
                                 "URI")  # fmt: skip
    return value
