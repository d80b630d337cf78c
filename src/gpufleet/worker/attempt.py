"""One task attempt, from "may it start" to its recorded outcome.

A single task, each event of a batch and each step of a job goes through the same steps, in this order:

1. may it start (:meth:`Attempt.may_start`): not cancelled, not older than ``max_event_age_s``, attempts left;
2. its payload (:meth:`Attempt.payload`): an object event completed with a HEAD, validated against the function's
   payload model;
3. running (:meth:`Attempts.running`): the lease keeper renews its lease and watches for its cancel, and the watchdog
   knows its hard time limit;
4. the handler, with its ``ctx`` (:meth:`Attempt.context`), under the soft time limit (:meth:`Attempts.guarded`);
5. its outcome: succeeded, cancelled, timed out, failed for good, retried later, or (its GPU ran out of memory, or
   broke) handed back uncounted under the function's ``oom_retries`` (:meth:`Attempt.failed`).

Only the call differs: one event (:meth:`Attempt.run`), several in one call (:mod:`gpufleet.worker.batch`), or a
job's split or merge (:mod:`gpufleet.worker.jobs`). The runtime claims the tasks and hands each here.
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import structlog

from gpufleet.aws import ObjectEvent
from gpufleet.delivery.records import Condition, error_payload
from gpufleet.errors import PermanentTaskError, TaskError, TaskPreempted
from gpufleet.functions import Function
from gpufleet.registry import inventory
from gpufleet.registry.messages import parse_queue, queue_name, queue_version
from gpufleet.registry.model import REDIS_ERRORS, State
from gpufleet.scheduling.estimate import has_room
from gpufleet.scheduling.placement import LIVE_S
from gpufleet.worker.bundle import ProcessBundle
from gpufleet.worker.context import TaskContext, handler_payload
from gpufleet.worker.gpufaults import BROKEN, OOM, Fault, fault_of, free_memory, peak_mb, reset_peak
from gpufleet.worker.gpus import GpuMemory
from gpufleet.worker.item import Item
from gpufleet.worker.outcome import Finisher, Outcomes, result_json

log = structlog.get_logger("gpufleet.worker")


GIL_SHARE = 0.8  # of a handler call's time on its own thread's CPU: it held the GIL (see Attempts.guarded)
GIL_MIN_S = 0.002  # shorter calls are not judged: their own Python around the handler is most of them


def held_gil(took_s: float, cpu_s: float) -> bool:
    """Whether a handler call of ``took_s`` that used ``cpu_s`` of its thread's CPU held the GIL. On a loaded host a
    pure-Python call waits for the CPU too, and may pass for one that waits: it is then claimed ahead of, as before."""
    return took_s >= GIL_MIN_S and cpu_s >= GIL_SHARE * took_s


def bigger_room(bundle: ProcessBundle, fn: Function, queue: str, memory: GpuMemory | None) -> tuple[str, int] | None:
    """Where a task that ran out of memory on this GPU (which had ``memory``) goes next, and the room a GPU there
    needs: more than this one had. Its own ``queue`` when a live GPU that reads it has that much (the inventory), else
    the same queue in another of its function's pools that has one (a pool with a bigger model); None when no GPU has
    (then any GPU of its queue may take it)."""
    if memory is None:
        return None
    need, prefix = memory.room_mb + 1, bundle.fleet.settings.redis.key_prefix
    try:
        entries = [e for e in inventory.gpus(bundle.registry, stale_after_s=LIVE_S) if e.get("up") and not e["stale"]]
    except REDIS_ERRORS:
        return None
    here = (parse_queue(prefix, queue) or ("",))[0]
    others = [queue_name(prefix, pool, fn.gpu.model, fn.name, queue_version(queue)) for pool in fn.gpu.pools]
    for candidate in [queue, *(q for q in others if q != queue and here)]:
        readers = [e for e in entries if candidate in e.get("queues", [])]
        if any(e.get("memory_total_mb") and has_room(e, need) for e in readers):
            return candidate, need
    return None


class Attempts:
    """One per pool process: the attempts its handler runs now, their soft time limit, and the cancel killer."""

    def __init__(self, bundle: ProcessBundle) -> None:
        self.bundle = bundle
        self._current: dict[str, Finisher] = {}  # the tasks the handler runs now, for the cancel killer
        self._in_handler = False
        self.held_gil = False  # whether the last handler call held the GIL (see guarded)
        self.broken = False  # a CUDA error broke this process's context: it is replaced once its outcomes are out
        self.preempted = False  # its host's GPUs are being reclaimed: it takes no new task
        self._contexts: dict[str, tuple[Function, Any]] = {}  # the running tasks' functions and ctx, for on_preempt
        bundle.on_overdue = self._cancel_overdue

    def install(self) -> None:
        """In the pool process's main thread, once: the soft time limit arrives as SIGALRM, a preemption notice as
        SIGUSR2 (from the supervisor; billiard keeps SIGUSR1 for its own soft limit)."""
        signal.signal(signal.SIGALRM, self._soft_limit)
        signal.signal(signal.SIGUSR2, self._preempt)

    @contextmanager
    def running(self, attempts: list[Attempt], limit: Function | None = None) -> Iterator[None]:
        """The handler runs ``attempts`` now: their leases are renewed and their cancel watched. With ``limit``, the
        watchdog times them against its hard limit (a batch arms it per call instead: see ``batch.settle``)."""
        tasks = [(a.item.task_id, a.item.token) for a in attempts]
        if limit is not None:
            self.bundle.slot.arm(tasks, time.time() + limit.timeout_s + self.bundle.kill_grace_s)
        self._current = {a.item.task_id: a.done for a in attempts}
        self.bundle.lease.hold(tasks)
        started = time.time()
        for a in attempts:
            a.done.started_at = started
        try:
            yield
        finally:
            self.bundle.lease.release()
            self._current = {}

    def guarded(self, fn: Function, call: Callable[[], Any], done: list[Finisher]) -> Any:
        """``call()`` (the handler) under the function's soft time limit; the most GPU memory it held and how long it
        ran (their GPU time) go to the outcomes ``done``. Notes whether it held the GIL: a call of over
        ``GIL_MIN_S`` that spent ``GIL_SHARE`` of its time on this thread's CPU ran Python (or C that keeps the GIL),
        not a wait on a GPU, a sleep or a C extension that lets go of it."""
        reset_peak()
        signal.setitimer(signal.ITIMER_REAL, fn.timeout_s)
        self._in_handler = True
        began, cpu = time.monotonic(), time.thread_time()
        try:
            return call()
        finally:
            self._in_handler = False
            signal.setitimer(signal.ITIMER_REAL, 0)
            took = time.monotonic() - began
            self.held_gil = held_gil(took, time.thread_time() - cpu)
            peak = peak_mb(self.bundle.device)
            for finisher in done:
                finisher.peak_mb = peak
                finisher.ran_s += took

    def recycle(self, pipe: Any) -> None:
        """After a CUDA error broke this process's context (every later CUDA call here fails too): write the outcomes
        in ``pipe`` and the tallies, then end the process; Celery starts a fresh one, and what it still held (a
        batch's events not yet run, a task claimed ahead) goes back uncounted (see :mod:`gpufleet.worker.watchdog`)."""
        if pipe is not None:
            pipe.execute()
        self.bundle.write_tally()
        log.error("a CUDA error broke this process's GPU context; replacing the process", pid=os.getpid())
        os.kill(os.getpid(), signal.SIGKILL)

    def _soft_limit(self, signum: int, frame: Any) -> None:
        """SIGALRM at ``timeout_s``: raised in the handler, as Celery's soft time limit is; ignored outside it."""
        if self._in_handler:
            from celery.exceptions import SoftTimeLimitExceeded

            raise SoftTimeLimitExceeded(f"timeout_s passed ({signum})")

    def _preempt(self, signum: int, frame: Any) -> None:
        """SIGUSR2: the host's GPUs are being reclaimed. Each running task's ``on_preempt`` hook runs (it may
        checkpoint), then the handler gets ``TaskPreempted``; the process takes no new task."""
        self.preempted = True
        if not self._in_handler:
            return
        for fn, ctx in list(self._contexts.values()):
            if fn.preempt_fn is not None:
                try:
                    fn.preempt_fn(ctx)
                except Exception:  # its task goes back all the same
                    log.exception("on_preempt failed", function=fn.name, task_id=ctx.task_id)
        raise TaskPreempted(f"the GPUs of {self.bundle.worker_name} are being reclaimed ({signum})")

    def _cancel_overdue(self, task_id: str, token: str) -> None:
        """Lease-keeper thread: a handler ignored a cancel for the grace period. Record CANCELLED; then, unless the
        task shares its call with others (a batch, which runs on), kill this pool process: Celery starts a fresh
        one, which warms up (``setup``) before it takes the next task."""
        done = self._current.get(task_id)
        if done is None or done.token != token:
            return
        grace = self.bundle.fleet.settings.worker.cancel_grace_s
        alone = len(self._current) == 1
        done.pipe = None  # written now: this process may be about to die
        how = "its process was killed" if alone else "the rest of its batch runs on"
        if done.cancelled(f"the handler ignored the cancel for {grace:g} s; {how}") and alone:
            log.warning("handler ignored cancel; killing its process", task_id=task_id, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)


class Attempt:
    """One attempt of one claimed task; its outcome goes into ``pipe`` (None: written at once)."""

    def __init__(self, attempts: Attempts, item: Item, fn: Function, pipe: Any = None) -> None:
        self.attempts = attempts
        self.item = item
        self.fn = fn
        self.done = Finisher(
            attempts.bundle, item.task_id, item.function, item.token, item.event, item.claim, fn, pipe=pipe
        )
        self.log = log.bind(
            task_id=item.task_id, function=item.function, event_id=item.meta.get("source"), attempt=item.claim.attempts
        )

    def may_start(self, check_age: bool = True) -> bool:
        """False, with its outcome recorded, for a task that must not run: cancelled, too old, or out of attempts."""
        claim, fn = self.item.claim, self.fn
        if claim.cancel_requested:  # cancelled while running on a worker that died before it could stop
            self.done.cancelled("cancelled before this attempt started")
            return False
        age = time.time() - claim.event_ts
        if check_age and fn.max_event_age_s is not None and age > fn.max_event_age_s:
            self.log.warning("event too old; expired without running", age_s=round(age, 3))
            message = f"event waited {age:.1f} s > max_event_age_s {fn.max_event_age_s:g}"
            error = {"errorType": "EventAgeExceeded", "errorMessage": message, "stackTrace": []}
            self.done.finish(State.EXPIRED, Condition.EVENT_AGE_EXCEEDED, error)
            return False
        if claim.attempts > claim.max_attempts:
            # Each earlier attempt killed its worker (a crash or OOM counts as an attempt, as in Lambda).
            self.done.fail(TaskError(f"worker lost {claim.attempts - 1} times"), "WorkerLost")
            return False
        return True

    def payload(self) -> tuple[Any, ObjectEvent | None]:
        """What the handler gets, and the object event (completed) of an object task."""
        return handler_payload(self.attempts.bundle.objects, self.fn, self.item.event, self.item.meta)

    @contextmanager
    def context(self, obj: ObjectEvent | None) -> Iterator[TaskContext]:
        """The handler's ``ctx``; its uploads go into the outcome, and its scratch directory is removed after."""
        bundle, item = self.attempts.bundle, self.item
        state = bundle.setups.state_of(self.fn)
        ctx = TaskContext(bundle, item.task_id, self.fn.name, item.claim.attempts, state, item.meta, obj, item.token)
        self.attempts._contexts[item.task_id] = (self.fn, ctx)
        try:
            yield ctx
        finally:
            self.attempts._contexts.pop(item.task_id, None)
            self.done.outputs = ctx.outputs
            ctx.close()

    @property
    def cancel_requested(self) -> bool:
        return self.attempts.bundle.lease.cancel_requested(self.item.task_id)

    def run(self, later: Outcomes) -> None:
        """A single task. Its success is built into ``later`` by whoever writes its pipeline, and its line said after:
        off the GPU's path when the claim-ahead helper does (see :mod:`gpufleet.worker.ahead`)."""
        if not self.may_start():
            return
        if self.attempts.preempted:  # the notice came between two tasks: this one goes back unstarted
            self.preempted()
            return
        with self.attempts.running([self], self.fn):
            self.log.debug("task started")  # at info, one line per task is enough: a log line costs ~0.15 ms
            began = time.monotonic()
            try:
                payload, obj = self.payload()
                call = functools.partial(self._call, payload, obj)
                try:
                    result = self.attempts.guarded(self.fn, call, [self.done])
                except Exception as exc:
                    if not self.again_here(exc):
                        raise
                    result = self.attempts.guarded(self.fn, call, [self.done])
                value = result_json(self.fn, result, "job" in self.item.meta)
            except TaskPreempted:
                self.preempted()
                return
            except Exception as exc:  # noqa: BLE001 - whatever the handler raised is its outcome; SystemExit goes up
                self.failed(exc)
                return
            if self.cancel_requested:
                self.log.info("task cancelled; the handler returned early")
                self.done.cancelled("cancelled while running; the handler returned early")
                return
            later.builds.append(functools.partial(self.done.succeed, value, self.done.outputs, time.time()))
            took, ids = round((time.monotonic() - began) * 1000, 3), structlog.contextvars.get_contextvars()
            later.lines.append(functools.partial(self.log.info, "task succeeded", duration_ms=took, **ids))

    def _call(self, payload: Any, obj: ObjectEvent | None) -> Any:
        with self.context(obj) as ctx:
            return self.fn.handler(payload, ctx)

    def again_here(self, exc: Exception) -> bool:
        """Whether a task whose GPU ran out of memory for the first time runs again at once where it was, its memory
        freed (most OOMs are a cache or a fragment the failed call left): the retry is recorded under its function's
        ``oom_retries``, and the process stays its owner, so no other GPU takes it meanwhile."""
        if fault_of(exc) != OOM or self.fn.oom_retries < 1 or self.cancel_requested:
            return False
        if int((self.attempts.bundle.registry.get(self.item.task_id) or {}).get("gpu_retries", 0)):
            return False
        free_memory(exc)
        error = self.oom_error(exc, OOM)
        if not self.done.again_here(error, self.fn.oom_retries):
            return False
        self.log.warning("GPU out of memory; running it again on this GPU, its memory freed", peak_mb=self.done.peak_mb)
        return True

    def preempted(self) -> None:
        """Its host's GPUs were reclaimed: back to the head of its queue, its attempt not spent, while the function's
        ``max_preemptions`` last; past them, a preemption is an attempt like any."""
        back = self.done.preempt(self.fn.max_preemptions)
        if back == 1:
            self.log.warning("preempted; task handed back, its attempt not spent")
        elif back == -1:
            self.failed(TaskError(f"preempted past max_preemptions ({self.fn.max_preemptions})"))

    def failed(self, exc: BaseException) -> None:
        """The outcome of an attempt that raised (or, in a batch, of an event whose result is an exception)."""
        from celery.exceptions import SoftTimeLimitExceeded

        done, fn = self.done, self.fn
        attempt, max_attempts = done.claim.attempts, done.claim.max_attempts
        if self.cancel_requested and isinstance(exc, Exception):
            self.log.info("task cancelled; the handler stopped with an error", error=repr(exc))
            done.cancelled("cancelled while running; the handler stopped")
        elif isinstance(exc, SoftTimeLimitExceeded):
            self.log.warning("task timed out", timeout_s=fn.timeout_s)
            timed_out = error_payload(exc, "TimedOut")
            timed_out["errorMessage"] = f"the handler ran past timeout_s ({fn.timeout_s:g} s)"
            done.finish(State.TIMED_OUT, Condition.TIMED_OUT, timed_out)
        elif not isinstance(exc, Exception):
            raise exc  # SystemExit / KeyboardInterrupt: let the worker shut down; the lease recovers the task
        elif (fault := fault_of(exc)) is not None:
            self.gpu_fault(exc, fault)
        elif isinstance(exc, PermanentTaskError):
            self.log.error("task failed; it cannot succeed, so it is not retried", error=str(exc))
            error = {"errorType": exc.error_type, "errorMessage": str(exc), "stackTrace": []}
            done.finish(State.FAILED, Condition.RETRIES_EXHAUSTED, error)
        elif attempt < max_attempts:
            delay = fn.backoff_for(attempt) * random.uniform(0.8, 1.2)
            self.log.warning("task failed; will retry", error=repr(exc), retry_in_s=round(delay, 3))
            done.retry_later(delay, error_payload(exc))
        else:
            self.log.error("task failed; retries exhausted", error=repr(exc))
            done.fail(exc)

    def oom_error(self, exc: Exception, fault: Fault, memory: GpuMemory | None = None) -> dict[str, Any]:
        """The error a GPU fault records, with the peak memory the handler held (see ``Attempts.guarded``)."""
        b = self.attempts.bundle
        error = error_payload(exc, "GpuOutOfMemory" if fault == OOM else "GpuContextBroken")
        peak = self.done.peak_mb
        if peak is not None:
            memory = memory or b.device.memory()
            total = f" of {memory.total_mb}" if memory is not None else ""
            error["errorMessage"] += f" (peak {peak} MiB{total} on {b.worker_name})"
            error["peakGpuMemoryMb"] = peak
        return error

    def gpu_fault(self, exc: Exception, fault: Fault) -> None:
        """Its GPU ran out of memory, or a CUDA error broke the process's context. The process gives back what the
        handler held; the task goes back to the head of its queue uncounted while the function's ``oom_retries``
        last: only to a GPU with more room than this one had where the fleet has one, else to any (a single task's
        first OOM ran again here first: :meth:`again_here`; a batch's, halved). Past them it fails,
        ``GpuOutOfMemory``, with the peak memory seen. A broken context is replaced (:meth:`Attempts.recycle`)."""
        b, fn, task_id = self.attempts.bundle, self.fn, self.item.task_id
        memory = b.device.memory(fresh=True)
        error, peak = self.oom_error(exc, fault, memory), self.done.peak_mb
        free_memory(exc)
        if fault == BROKEN:
            self.attempts.broken = True
        queue = self.item.claim.queue
        again = int((b.registry.get(task_id) or {}).get("gpu_retries", 0)) >= 1
        where = bigger_room(b, fn, queue, memory) if fault == OOM and again else None  # room is an OOM's cure only
        back = self.done.ran_out(error, fn.oom_retries, where[1] if where else None)
        if back == 1:
            self.log.warning("GPU fault; task handed back uncounted", fault=fault, peak_mb=peak, needs=where)
        if back == 1 and where is not None and where[0] != queue:  # to the pool with a GPU that has the room
            prefix = b.fleet.settings.redis.key_prefix
            pools = ((parse_queue(prefix, queue) or ("",))[0], (parse_queue(prefix, where[0]) or ("",))[0])
            b.registry.move_queued([task_id], queue, where[0], b.envelopes, pools)
        elif back == -1:
            self.log.error("GPU fault; oom_retries exhausted", fault=fault, peak_mb=peak, oom_retries=fn.oom_retries)
            error["errorMessage"] += f"; failed after oom_retries ({fn.oom_retries}) more runs"
            self.done.finish(State.FAILED, Condition.RETRIES_EXHAUSTED, error)
