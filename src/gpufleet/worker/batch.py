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
- a call that runs out of GPU memory is split in halves too, once the process gave back what the call held; the
  largest that then fitted is the most a batch of the function holds on that GPU model for ``FIT_TTL_S``, on every
  worker (:class:`BatchFit`). A single event out of memory goes back under ``oom_retries`` (see
  :meth:`~gpufleet.worker.attempt.Attempt.gpu_fault`). A CUDA error that broke the context runs nothing more: the
  call's events go back under the same budget, the others uncounted, and the process is replaced;
- an event cancelled while the batch runs ends CANCELLED whatever the handler returned for it. One that ignores the
  cancel for ``cancel_grace_s`` is recorded CANCELLED then, and its neighbours run on (the process is not killed).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import ExitStack
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.aws import ObjectEvent
from gpufleet.errors import PermanentTaskError, TaskPreempted
from gpufleet.functions import Function
from gpufleet.worker.attempt import Attempt, Attempts
from gpufleet.worker.context import TaskContext
from gpufleet.worker.gpufaults import BROKEN, OOM, fault_of, free_memory
from gpufleet.worker.item import Item
from gpufleet.worker.outcome import result_json

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from gpufleet.worker.gpus import GpuMemory

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

    @property
    def gpu_memory(self) -> GpuMemory | None:
        return self.items[0].gpu_memory


@dataclass
class Member:
    """One event of a batch, ready to run: its attempt, and the payload the handler gets."""

    attempt: Attempt
    payload: Any
    obj: ObjectEvent | None  # the object event, completed, for an object task

    @property
    def task(self) -> tuple[str, str]:
        return self.attempt.item.task_id, self.attempt.item.token


def gather(
    first: Item, fn: Function, take: Callable[[int], list[Item]], stopping: Callable[[], bool], max_size: int
) -> list[Item]:
    """The first task, then up to ``max_size`` in all of ``fn``'s queued tasks (``take(n)`` claims up to ``n`` more),
    as described in the module docstring."""
    assert fn.batch is not None
    items = [first]
    if first.claim.attempts > 1:  # its last call may have died with its process: alone (module docstring)
        return items
    formed = time.monotonic()
    while len(items) < max_size and not stopping():  # stopping: take nothing more
        got = take(max_size - len(items))
        items += got
        left = fn.batch.max_wait_ms / 1000 - (time.monotonic() - formed)
        if not got or left <= 0:  # a lone task (nothing more queued) runs at once
            break
        time.sleep(min(POLL_S, left))
    return items


def run(attempts: Attempts, items: list[Item], fn: Function, pipe: Any) -> None:
    """Each event's own checks and payload, then the calls for those that may run; outcomes go into ``pipe``."""
    members: list[Member] = []
    for item in items:
        attempt = Attempt(attempts, item, fn, pipe)
        if not attempt.may_start():
            continue
        try:
            payload, obj = attempt.payload()
        except Exception as exc:  # noqa: BLE001 - one event's payload: that event fails alone
            attempt.failed(exc)
            continue
        members.append(Member(attempt, payload, obj))
    if not members:
        return
    with attempts.running([m.attempt for m in members]):
        log.info("batch started", function=fn.name, size=len(members), task_ids=[m.task[0] for m in members])
        each = calls(members)
        for n, call in enumerate(each):
            settle(attempts, fn, call, [m for later in each[n + 1 :] for m in later], [m for e in each[:n] for m in e])


def calls(members: list[Member]) -> list[list[Member]]:
    """The calls a batch makes: the events on their first attempt together, then each one on a later attempt alone."""
    first = [m for m in members if m.attempt.item.claim.attempts == 1]
    return ([first] if first else []) + [[m] for m in members if m.attempt.item.claim.attempts > 1]


def settle(
    attempts: Attempts, fn: Function, members: list[Member], waiting: list[Member], ran: list[Member] | None = None
) -> None:
    """Call the handler for ``members`` and record each one's outcome; split and call again when the call raises or
    times out. On the watchdog's page meanwhile: ``waiting``, the batch's events that wait for a later call, and
    ``ran``, those an earlier call ran (their outcomes are written once the batch is done)."""
    if not members or attempts.broken:  # a broken context runs nothing more: these go back as the process is replaced
        return
    if attempts.preempted:  # the host's GPUs are being reclaimed: the rest go back, their attempts not spent
        for m in members:
            m.attempt.preempted()
        return
    ran = ran or []
    deadline = time.time() + fn.timeout_s + attempts.bundle.kill_grace_s
    attempts.bundle.slot.arm([m.task for m in members], deadline, [m.task for m in waiting], [m.task for m in ran])
    try:
        results = attempts.guarded(fn, lambda: _call(attempts, fn, members), [m.attempt.done for m in members])
    except TaskPreempted:
        for m in members:
            m.attempt.preempted()
        return
    except Exception as exc:  # noqa: BLE001 - whatever the handler raised, or its time limit; SystemExit goes on up
        fault = fault_of(exc)
        if len(members) == 1 or fault == BROKEN:
            for m in members:
                m.attempt.failed(exc)
            return
        if fault == OOM:
            free_memory(exc)
            attempts.bundle.batch_fit.ran_out(fn, len(members))
        half = len(members) // 2
        log.warning("batch call failed; trying its halves", function=fn.name, size=len(members), error=repr(exc))
        settle(attempts, fn, members[:half], members[half:] + waiting, ran)
        settle(attempts, fn, members[half:], waiting, ran + members[:half])
        return
    attempts.bundle.batch_fit.fitted(fn, len(members))
    for m, result in zip(members, results, strict=True):
        attempt = m.attempt
        if attempt.cancel_requested:
            attempt.done.cancelled("cancelled while running; the batch ran on")
        elif isinstance(result, BaseException):
            attempt.done.handled = True  # returned, not raised: Lambda's "Handled" function error
            attempt.failed(result)
        else:
            try:
                attempt.done.succeed(result_json(fn, result, "job" in attempt.item.meta), attempt.done.outputs)
            except PermanentTaskError as exc:
                attempt.failed(exc)


def _call(attempts: Attempts, fn: Function, members: list[Member]) -> list[Any]:
    bundle = attempts.bundle
    with ExitStack() as stack:
        contexts = [stack.enter_context(m.attempt.context(m.obj)) for m in members]
        ctx = BatchContext(contexts, fn.name, bundle.worker_name, bundle.gpu, bundle.setups.state_of(fn))
        results = fn.handler([m.payload for m in members], ctx)
    if not isinstance(results, list | tuple) or len(results) != len(members):
        got = f"{len(results)} results" if isinstance(results, list | tuple) else f"a {type(results).__name__}"
        raise PermanentTaskError(
            "BadBatchResult",
            f"batch function {fn.name!r} returned {got} for {len(members)} "
            "events; return a list with one result per event, in order",
        )
    return list(results)
