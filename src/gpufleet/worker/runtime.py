"""What runs inside a GPU worker's pool process: claim the task, run the handler, record the outcome.

The runtime owns one task at a time (concurrency 1). Per process it keeps:
- the warm state of each function (``setup()`` runs once, on first use, after fork);
- a lease keeper thread that renews the running task's lease, so a dead worker is noticed in seconds;
- a helper thread that claims the next task and writes the last outcome while a handler runs (see ahead).
"""

from __future__ import annotations

import functools
import os
import random
import signal
import time
from collections.abc import Callable
from typing import Any

import structlog

from gpufleet import trace
from gpufleet.config import Fleet
from gpufleet.errors import PermanentTaskError, TaskError
from gpufleet.functions import Function
from gpufleet.jobs import WAITING
from gpufleet.messages import Envelopes, MessageFactory, parse_queue
from gpufleet.objects import ObjectEvent, ObjectStore
from gpufleet.records import Condition, error_payload
from gpufleet.registry import REDIS_ERRORS, TERMINAL, Claim, Registry, State, Taken
from gpufleet.worker import batch
from gpufleet.worker.ahead import HOLD_S, Ahead
from gpufleet.worker.context import TaskContext, handler_payload
from gpufleet.worker.item import Item
from gpufleet.worker.jobs import JobSteps
from gpufleet.worker.lease import LeaseKeeper, owner_is_dead, owner_token
from gpufleet.worker.outcome import Finisher, Outcomes
from gpufleet.worker.scratch import default_root, open_root
from gpufleet.worker.warmup import Setups
from gpufleet.worker.watchdog import SharedSlot

log = structlog.get_logger("gpufleet.worker")
# How long a pool process keeps taking tasks straight from its queues before it returns to Celery (see execute).
DRAIN_S = 1.0
# How long a pool process pauses after handing back a task of a function whose setup() failed in it: another worker
# (blocked on the queue longer) takes it, rather than this one again.
NOT_READY_PAUSE_S = 1.0


class Runtime:
    def __init__(self, fleet: Fleet, worker_name: str, gpu: str, queues: list[str] | None = None,
                 slot: SharedSlot | None = None) -> None:  # fmt: skip
        self.fleet = fleet
        self.worker_name = worker_name
        self.gpu = gpu
        self.queues = queues or []  # the Celery queues this worker reads, in its order
        self._queues_turn = 0
        self.slot = slot or SharedSlot()  # shared with the parent process, which watches it (see watchdog)
        self._in_handler = False
        self.kill_grace_s = fleet.settings.worker.kill_grace_s
        self.host = fleet.settings.worker.hostname
        self.lease_s = fleet.settings.worker.lease_s
        self._setups: Setups | None = None
        self._registry: Registry | None = None
        self._lease: LeaseKeeper | None = None
        self._ahead: Ahead | None = None
        self._envelopes: Envelopes | None = None
        self._jobs: JobSteps | None = None
        self._ran: list[tuple[str, str]] = []  # the tasks of the last run, whose outcomes may be on their way
        self._built: list[Callable[[], Any]] = []  # the last run's outcomes, to build into its pipeline
        self._said: list[Callable[[], None]] = []  # the last run's log lines, said once its outcomes are written
        self._recent: dict[str, float] = {}  # seconds each function's last run here took (see execute)
        self._current: dict[str, Finisher] = {}  # the tasks the handler runs now, for the cancel killer
        self._objects: ObjectStore | None = None
        self.scratch_root = fleet.settings.worker.scratch_dir or default_root()

    def check_scratch(self) -> None:
        """Create the scratch root (0700) or check an existing one, so that a root another user owns stops the
        worker when it starts rather than failing each task.

        Raises:
            ConfigError: the root is a symlink, not a directory, or another user's.
        """
        os.close(open_root(self.scratch_root))

    @property
    def registry(self) -> Registry:
        if self._registry is None:
            s = self.fleet.settings
            self._registry = Registry.for_fleet(s)
        return self._registry

    @property
    def objects(self) -> ObjectStore:
        if self._objects is None:
            self._objects = ObjectStore(self.fleet.settings.s3)
        return self._objects

    @property
    def ahead(self) -> Ahead:
        if self._ahead is None:
            self._ahead = Ahead(self._round_trip, self._give_back, self.slot.hold)
        return self._ahead

    @property
    def envelopes(self) -> Envelopes:
        """Builds a task's message again, to give back a task claimed ahead."""
        if self._envelopes is None:
            factory = MessageFactory(self.fleet.settings.redis.key_prefix, self.kill_grace_s)
            self._envelopes = Envelopes(factory, self.fleet.functions)
        return self._envelopes

    @property
    def setups(self) -> Setups:
        if self._setups is None:
            self._setups = Setups(self.registry, self.worker_name, self.fleet.settings.worker.setup_retry_s)
        return self._setups

    @property
    def jobs(self) -> JobSteps:
        if self._jobs is None:
            self._jobs = JobSteps(self)
        return self._jobs

    @property
    def lease(self) -> LeaseKeeper:
        if self._lease is None:
            grace = self.fleet.settings.worker.cancel_grace_s
            self._lease = LeaseKeeper(self.registry, self.lease_s, grace, self._cancel_overdue)
            self._lease.start()
        return self._lease

    def boot(self) -> None:
        """``worker_process_init``: fresh connections after fork; never reuse the parent's sockets."""
        self._registry = None
        self._lease = None
        self._ahead = None
        self._objects = None
        self._jobs = None
        self._setups = None
        self.lease.name = f"gpufleet-lease-{os.getpid()}"
        signal.signal(signal.SIGALRM, self._soft_limit)
        # The process this one replaces may have died mid-task: its tasks go back now. The parent's watchdog does the
        # same, but this process could otherwise take a task (Celery redelivers at once) and overwrite the page first.
        running = self.slot.read()
        if running is not None and running.all and owner_is_dead(running.all[0][1], self.host):
            try:
                for task_id, token in running.tasks + running.held:
                    self.registry.lapse(task_id, token)
                for task_id, token in running.not_started:  # another task's death is not theirs: not counted
                    self.give_back(task_id, token)
            except REDIS_ERRORS:  # their leases lapse anyway, later
                log.warning("cannot hand back the tasks of the process this one replaces", exc_info=True)
        # Warm every function now, so the first task does not pay for loading a model; the fleet sees how it went.
        self.setups.warm_up(self.fleet.functions.values())
        try:  # ready: the supervisor's inventory shows it, and the scaling figure stops counting it as starting
            self.registry.client.hset(f"{self.registry.prefix}:ready", self.worker_name, os.getppid())
        except REDIS_ERRORS:
            log.warning("cannot mark this worker ready in Redis; it takes tasks anyway", exc_info=True)

    def execute(self, task_id: str, function: str, event: Any, meta: dict[str, Any]) -> None:
        """The Celery task's body: run the delivered task, then the next ones straight from this worker's queues.

        Going back to Celery between two tasks costs its ack, its next fetch and the dispatch to this process: a few
        ms, which on short tasks is GPU time lost. So the next task is claimed while the current one runs, and the
        outcome is written on the way (:mod:`gpufleet.worker.ahead`), the same next message Celery's consumer would
        pop (:meth:`Registry.pop_claim`). When nothing was claimed ahead, the outcome is written in the round trip
        that claims the next. After ``DRAIN_S``, on an empty queue, or once a warm shutdown began, the task returns
        to Celery, which acknowledges its message. Time limits, cancel and leases are per task (see
        :mod:`gpufleet.worker.watchdog`).
        """
        item = self._take_delivery(task_id, function, event, meta)
        until = time.monotonic() + DRAIN_S
        written: Outcomes | None = None  # the last run's outcomes, for the helper to write
        try:
            while item is not None:
                more = self._more(until)
                # Claim ahead only behind a function whose last run here was short; one never run here counts as long.
                claim = more and self._recent.get(item.function, HOLD_S) < HOLD_S
                if written is not None or claim:
                    self.ahead.send(written, claim, self._ran)
                pipe = self.registry.pipeline()
                self._run_traced(item, pipe)
                outcomes, self._built, self._said = Outcomes(pipe, self._built, self._said), [], []
                item, written = self.ahead.take(), outcomes
                if item is None:
                    written = None
                    outcomes.build()
                    if not self._more(until):
                        self._commit(pipe.execute())
                    else:
                        item = self._next(pipe)
                    outcomes.say()
        finally:
            # Idle now (or on the way out with an error): nothing for the watchdog to time. A task whose outcome did
            # not reach Redis keeps its lease, which lapses: it runs again.
            left = self.ahead.take()
            if left is not None:
                self._give_back(left)
            self.slot.disarm()

    def _more(self, until: float) -> bool:
        """Whether this run takes another task from the queues: it has queues, within DRAIN_S, no shutdown begun."""
        return bool(self.queues) and not self.slot.stopping and time.monotonic() < until

    def _commit(self, answers: list[Any]) -> None:
        if not all(answers):
            log.warning("a task was taken over or finished elsewhere; its outcome here was not recorded")

    def _round_trip(self, outcomes: Outcomes | None, claim: bool) -> Item | None:
        """The helper thread's (see :mod:`gpufleet.worker.ahead`): write the outcomes, and with ``claim`` claim the
        next task in the same round trip."""
        pipe = outcomes.pipe if outcomes is not None else None
        if outcomes is not None:
            outcomes.build()
        item = None
        if claim:
            item = self._next(pipe)
        elif pipe is not None:
            self._commit(pipe.execute())
        if outcomes is not None:
            outcomes.say()
        return item

    def give_back(self, task_id: str, token: str) -> bool:
        """A task this process (or the dead one ``token`` names) claimed but never started: back to the head of its
        queue, its attempt not counted. False if it finished or changed owner meanwhile."""
        return self.registry.hand_back(task_id, token, self.envelopes, None)

    def _give_back(self, item: Item) -> None:
        if self.give_back(item.task_id, item.token):
            log.info("task claimed ahead given back to the head of its queue", task_id=item.task_id)
        else:
            log.info("a task claimed ahead was taken over or cancelled before it was given back", task_id=item.task_id)

    def _next(self, pipe: Any) -> Item | None:
        """Write the last outcome (in ``pipe``, if any) and take the next task, in one round trip."""
        self._queues_turn = (self._queues_turn + 1) % len(self.queues)  # the queues take turns being read first
        queues = self.queues[self._queues_turn :] + self.queues[: self._queues_turn]
        if self.setups.failed:  # not the queues of a function whose setup() failed here
            prefix = self.fleet.settings.redis.key_prefix
            queues = [q for q in queues if (parse_queue(prefix, q) or (None,) * 3)[2] not in self.setups.failed]
            if not queues:
                return None
        while True:
            token = owner_token(self.host, os.getpid())
            earlier, taken = self.registry.pop_claim(queues, token, self.lease_s, self.worker_name, self.gpu, pipe)
            self._commit(earlier)
            if not taken:
                return None
            items = self._items(taken, token)
            if items:
                return items[0]
            pipe = None

    def _items(self, taken: list[Taken | str], token: str) -> list[Item]:
        """The tasks :meth:`Registry.pop_claim` claimed. Another copy of a task that is not waiting is judged as any
        delivery: dropped, or taken over from an owner that died."""
        items = []
        for got in taken:
            if isinstance(got, Taken):
                items.append(Item(got.task_id, got.function, got.event, got.meta, got.claim, token))
                continue
            claim = self._take_over(got, token, log.bind(task_id=got))
            record = self.registry.get(got, event=True) if claim is not None else None
            if claim is not None and record is not None:
                items.append(Item(got, record["function"], record.get("event"), record.get("meta") or {}, claim,
                                   token))  # fmt: skip
        return items

    def _take_delivery(self, task_id: str, function: str, event: Any, meta: dict[str, Any]) -> Item | None:
        """Claim the task Celery delivered: QUEUED and nobody's (one round trip), or taken over from a dead owner."""
        token = owner_token(self.host, os.getpid())
        try:
            claim = self.registry.claim(task_id, State.QUEUED, "", token, self.lease_s, self.worker_name, self.gpu)
            if not claim.ok:
                taken = self._take_over(task_id, token, log.bind(task_id=task_id, function=function))
                if taken is None:
                    return None
                claim = taken
        except REDIS_ERRORS as exc:
            # Celery would ack a failed task and the message would be gone: put it back instead, after a pause.
            from celery.exceptions import Reject

            log.warning("registry unreachable; the message goes back to the queue", task_id=task_id, error=str(exc))
            time.sleep(1)
            raise Reject(str(exc), requeue=True) from exc
        return Item(task_id, function, event, meta, claim, token)

    def _run_traced(self, item: Item, pipe: Any) -> None:
        # Every line logged while the task runs (ours, the handler's, its print()s) carries its trace.
        structlog.contextvars.bind_contextvars(**trace.ids(item.meta.get(trace.HEADER)))
        try:
            self._run(item, pipe)
        finally:
            structlog.contextvars.unbind_contextvars("trace_id", "span_id")

    def _run(self, item: Item, pipe: Any) -> None:
        """Run one claimed task (or the batch it starts); outcomes go into ``pipe``."""
        fn = self.fleet.functions.get(item.function)
        done = Finisher(self, item.task_id, item.function, item.token, item.event, item.claim, fn, pipe=pipe)
        self._ran = [(item.task_id, item.token)]
        if fn is None:
            done.fail(TaskError(f"this worker does not serve function {item.function!r}"), "UnknownFunction")
            return
        if not self.setups.ready(fn):
            self._not_ready(item, fn)
            return
        if fn.batch is not None:
            self._run_batch(batch.gather(self, item, fn), fn, pipe)
            return
        self.slot.arm([(item.task_id, item.token)], time.time() + fn.timeout_s + self.kill_grace_s)
        bound = self._bound(item)
        if fn.shards is not None:
            self.jobs.run(item, fn, done, bound)
            return
        if not self.may_start(item, done, fn, bound):
            return
        self.begin(item, done)
        bound.debug("task started")  # at info, one line per task is enough: a log line costs ~0.15 ms between tasks
        began = time.monotonic()
        try:
            payload, obj = handler_payload(self.objects, fn, item.event, item.meta)
            result = self.guarded(fn, lambda: self._call(fn, item, payload, obj, done))
            value = batch.to_json(fn, result, "job" in item.meta)
        except Exception as exc:  # noqa: BLE001 - whatever the handler raised is its outcome; SystemExit goes on up
            self.failed(done, exc, fn, bound)
        else:
            if self.lease.cancel_requested(item.task_id):
                bound.info("task cancelled; the handler returned early")
                done.cancelled("cancelled while running; the handler returned early")
            else:
                # The record is built and the outcome written by whoever writes the pipeline, and the line said after:
                # off the GPU's path when the helper thread does (see execute).
                self._built.append(functools.partial(done.succeed, value, done.outputs, time.time()))
                took, ids = round((time.monotonic() - began) * 1000, 3), structlog.contextvars.get_contextvars()
                self._said.append(functools.partial(bound.info, "task succeeded", duration_ms=took, **ids))
        finally:
            self._recent[fn.name] = time.monotonic() - began
            self.end()

    def _not_ready(self, item: Item, fn: Function) -> None:
        """``fn``'s setup() failed in this process: the task goes back to the head of its queue unstarted (its attempt
        not counted) for a worker where it works, and this one pauses, so as not to take it straight back. The pause
        doubles at each hand-back of the function, up to ``worker.setup_retry_s`` (it was one second, for ever)."""
        why = f"setup() of {fn.name} failed on {self.worker_name}: {self.setups.why(fn)}"
        pause = self.setups.pause(fn, NOT_READY_PAUSE_S)
        if self.registry.hand_back(item.task_id, item.token, self.envelopes, why, "SetupFailed"):
            log.warning("setup() failed here; task handed back", task_id=item.task_id, function=fn.name,
                        pause_s=pause)  # fmt: skip
        time.sleep(pause)

    def begin(self, item: Item, done: Finisher) -> None:
        """The task's handler starts now: the cancel killer and the lease keeper know it."""
        self._current = {item.task_id: done}
        self.lease.hold([(item.task_id, item.token)])
        done.started_at = time.time()

    def end(self) -> None:
        self.lease.release()
        self._current = {}

    def _run_batch(self, items: list[Item], fn: Function, pipe: Any) -> None:
        """Each task's own checks, then one call for those that may run (see :mod:`gpufleet.worker.batch`)."""
        members: list[batch.Member] = []
        self._ran = [(item.task_id, item.token) for item in items]
        for item in items:
            done = Finisher(self, item.task_id, item.function, item.token, item.event, item.claim, fn, pipe=pipe)
            if not self.may_start(item, done, fn, self._bound(item)):
                continue
            try:
                payload, obj = handler_payload(self.objects, fn, item.event, item.meta)
            except Exception as exc:  # noqa: BLE001 - one event's payload: that event fails alone
                self.failed(done, exc, fn, self._bound(item))
                continue
            members.append(batch.Member(item, done, payload, obj))
        if not members:
            return
        self._current = {m.item.task_id: m.done for m in members}
        self.lease.hold([(m.item.task_id, m.item.token) for m in members])
        log.info("batch started", function=fn.name, size=len(members), task_ids=[m.item.task_id for m in members])
        began = time.monotonic()
        try:
            calls = batch.calls(members)
            for n, call in enumerate(calls):
                batch.settle(self, fn, call, lambda m, exc: self.failed(m.done, exc, fn, self._bound(m.item)),
                             [m for later in calls[n + 1 :] for m in later])  # fmt: skip
        finally:
            self._recent[fn.name] = time.monotonic() - began
            self.end()

    def _bound(self, item: Item) -> Any:
        return log.bind(task_id=item.task_id, function=item.function, event_id=item.meta.get("source"),
                        attempt=item.claim.attempts)  # fmt: skip

    def may_start(self, item: Item, done: Finisher, fn: Function, bound: Any, check_age: bool = True) -> bool:
        """False, with its outcome recorded, for a task that must not run: cancelled, too old, or out of attempts."""
        claim = item.claim
        if claim.cancel_requested:  # cancelled while running on a worker that died before it could stop
            done.cancelled("cancelled before this attempt started")
            return False
        age = time.time() - claim.event_ts
        if check_age and fn.max_event_age_s is not None and age > fn.max_event_age_s:
            bound.warning("event too old; expired without running", age_s=round(age, 3))
            done.finish(State.EXPIRED, Condition.EVENT_AGE_EXCEEDED, {"errorType": "EventAgeExceeded",
                        "errorMessage": f"event waited {age:.1f} s > max_event_age_s {fn.max_event_age_s:g}",
                        "stackTrace": []})  # fmt: skip
            return False
        if claim.attempts > claim.max_attempts:
            # Each earlier attempt killed its worker (a crash or OOM counts as an attempt, as in Lambda).
            done.fail(TaskError(f"worker lost {claim.attempts - 1} times"), "WorkerLost")
            return False
        return True

    def failed(self, done: Finisher, exc: BaseException, fn: Function, bound: Any) -> None:
        """The outcome of an attempt that raised (or, in a batch, of an event whose result is an exception)."""
        from celery.exceptions import SoftTimeLimitExceeded

        attempt, max_attempts = done.claim.attempts, done.claim.max_attempts
        if self.lease.cancel_requested(done.task_id) and isinstance(exc, Exception):
            bound.info("task cancelled; the handler stopped with an error", error=repr(exc))
            done.cancelled("cancelled while running; the handler stopped")
        elif isinstance(exc, SoftTimeLimitExceeded):
            bound.warning("task timed out", timeout_s=fn.timeout_s)
            timed_out = error_payload(exc, "TimedOut")
            timed_out["errorMessage"] = f"the handler ran past timeout_s ({fn.timeout_s:g} s)"
            done.finish(State.TIMED_OUT, Condition.TIMED_OUT, timed_out)
        elif not isinstance(exc, Exception):
            raise exc  # SystemExit / KeyboardInterrupt: let the worker shut down; the lease recovers the task
        elif isinstance(exc, PermanentTaskError):
            bound.error("task failed; it cannot succeed, so it is not retried", error=str(exc))
            done.finish(State.FAILED, Condition.RETRIES_EXHAUSTED,
                        {"errorType": exc.error_type, "errorMessage": str(exc), "stackTrace": []})  # fmt: skip
        elif attempt < max_attempts:
            delay = fn.backoff_for(attempt) * random.uniform(0.8, 1.2)
            bound.warning("task failed; will retry", error=repr(exc), retry_in_s=round(delay, 3))
            self.registry.retry_later(done.task_id, done.token, delay, error_payload(exc), done.pipe)
        else:
            bound.error("task failed; retries exhausted", error=repr(exc))
            done.fail(exc)

    def _soft_limit(self, signum: int, frame: Any) -> None:
        """SIGALRM at ``timeout_s``: raised in the handler, as Celery's soft time limit is; ignored outside it."""
        if self._in_handler:
            from celery.exceptions import SoftTimeLimitExceeded

            raise SoftTimeLimitExceeded(f"timeout_s passed ({signum})")

    def _cancel_overdue(self, task_id: str, token: str) -> None:
        """Lease-keeper thread: a handler ignored a cancel for the grace period. Record CANCELLED; then, unless the
        task shares its call with others (a batch, which runs on), kill this pool process: Celery starts a fresh
        one, which warms up (``setup``) before it takes the next task."""
        done = self._current.get(task_id)
        if done is None or done.token != token:
            return
        grace = self.fleet.settings.worker.cancel_grace_s
        alone = len(self._current) == 1
        done.pipe = None  # written now: this process may be about to die
        how = "its process was killed" if alone else "the rest of its batch runs on"
        if done.cancelled(f"the handler ignored the cancel for {grace:g} s; {how}") and alone:
            log.warning("handler ignored cancel; killing its process", task_id=task_id, pid=os.getpid())
            os.kill(os.getpid(), signal.SIGKILL)

    def _take_over(self, task_id: str, token: str, bound: Any) -> Claim | None:
        """The task was not QUEUED: drop a duplicate delivery, or take over from an owner that died."""
        record = self.registry.get(task_id)
        if record is None:
            bound.warning("no registry record (expired or never enqueued); dropping the message")
            return None
        state = State(record["state"])
        if state in TERMINAL:
            bound.info("duplicate delivery of a finished task; dropped", state=state.value)
            return None
        owner = record.get("token", "")
        if owner == WAITING:
            bound.info("job waits for its shards; dropping this delivery")
            return None
        if state is State.RUNNING:
            lapsed = float(record.get("lease_until", 0)) < time.time()
            if not (lapsed or owner_is_dead(owner, self.host)):
                bound.info("task is running elsewhere; dropping this delivery", owner=owner)
                return None
            bound.warning("taking over a task whose worker died", owner=owner)
        claim = self.registry.claim(task_id, state, owner, token, self.lease_s, self.worker_name, self.gpu)
        if not claim.ok:
            bound.info("another delivery claimed the task first", state=claim.seen_state)
            return None
        return claim

    def guarded(self, fn: Function, call: Callable[[], Any]) -> Any:
        """``call()`` (the handler) under the function's soft time limit."""
        signal.setitimer(signal.ITIMER_REAL, fn.timeout_s)
        self._in_handler = True
        try:
            return call()
        finally:
            self._in_handler = False
            signal.setitimer(signal.ITIMER_REAL, 0)

    def state_of(self, fn: Function) -> Any:
        """What the function's ``setup()`` returned in this process (run now, if it has not run yet)."""
        return self.setups.state_of(fn)

    def _call(self, fn: Function, item: Item, payload: Any, obj: ObjectEvent | None, done: Finisher) -> Any:
        ctx = TaskContext(self, item.task_id, fn.name, item.claim.attempts, self.state_of(fn), item.meta, obj)
        try:
            return fn.handler(payload, ctx)
        finally:
            done.outputs = ctx.outputs
            ctx.close()

    def function_queues(self, name: str) -> list[str]:
        """This worker's queues of one function (a batch forms from them)."""
        prefix = self.fleet.settings.redis.key_prefix
        return [q for q in self.queues if (parsed := parse_queue(prefix, q)) is not None and parsed[2] == name]

    def take(self, queues: list[str], n: int, token: str) -> list[Item]:
        """Up to ``n`` more tasks from ``queues``, claimed under ``token``."""
        _, taken = self.registry.pop_claim(queues, token, self.lease_s, self.worker_name, self.gpu, n=n)
        return self._items(taken, token)
