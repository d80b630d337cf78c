"""What runs inside a GPU worker's pool process: claim the task, run the handler, record the outcome.

The runtime owns one task at a time (concurrency 1). Per process it keeps:
- the warm state of each function (``setup()`` runs once, on first use, after fork);
- a lease keeper thread that renews the running task's lease, so a dead worker is noticed in seconds;
- a helper thread that claims the next task and writes the last outcome while a handler runs (see ahead).
"""

from __future__ import annotations

import os
import time
from typing import Any

import structlog

from gpufleet import trace
from gpufleet.config import Fleet
from gpufleet.errors import TaskError
from gpufleet.functions import Function
from gpufleet.registry import inventory
from gpufleet.registry.jobs import WAITING
from gpufleet.registry.messages import PRIORITY_STEPS, parse_queue, priority_list
from gpufleet.registry.model import GPU_MEMORY_WAIT, REDIS_ERRORS, TERMINAL, Claim, State, Taken
from gpufleet.worker import batch
from gpufleet.worker.ahead import HOLD_S, LEAD_S, Ahead
from gpufleet.worker.attempt import Attempt, Attempts
from gpufleet.worker.bundle import ProcessBundle
from gpufleet.worker.item import Item
from gpufleet.worker.jobs import JobSteps
from gpufleet.worker.lease import owner_is_dead, owner_token, process_owner
from gpufleet.worker.outcome import Finisher, Outcomes
from gpufleet.worker.room import Room
from gpufleet.worker.watchdog import SharedSlot, bury

log = structlog.get_logger("gpufleet.worker")
# How long a pool process keeps taking tasks straight from its queues, waiting on them when they are empty, before it
# returns to Celery (see execute). A message that arrives as it returns takes Celery's slower path: 1 s made that 2 %
# of the tasks at 50/s, and each was a p99 one.
DRAIN_S = 5.0
WAIT_SLICE_S = 0.25  # how long one wait on the queues blocks: a warm shutdown is seen within it
# How long a pool process pauses after handing back a task of a function whose setup() failed in it: another worker
# (blocked on the queue longer) takes it, rather than this one again.
NOT_READY_PAUSE_S = 1.0


class Runtime:
    """Claims this pool process's tasks and drains its queues; each claimed task's attempt runs in
    :mod:`gpufleet.worker.attempt`."""

    def __init__(
        self,
        fleet: Fleet,
        worker_name: str,
        gpu: str,
        queues: list[str] | None = None,
        slot: SharedSlot | None = None,
        device: str = "",
        holds_on: tuple[int, ...] = (),
    ) -> None:
        self.fleet = fleet
        self.queues = queues or []  # the Celery queues this worker reads, in its order
        self._queues_turn = 0
        self.bundle = ProcessBundle(fleet, worker_name, gpu, slot, device, holds_on, self.queues)
        self.attempts = Attempts(self.bundle)
        self.room = Room(self.bundle)
        self._ahead: Ahead | None = None
        self._jobs: JobSteps | None = None
        self._ran: list[tuple[str, str]] = []  # the tasks of the last run, whose outcomes may be on their way
        # Each function's last run here: its seconds, and whether its handler held the GIL (see _claim_in).
        self._recent: dict[str, tuple[float, bool]] = {}

    @property
    def slot(self) -> SharedSlot:
        return self.bundle.slot

    @property
    def ahead(self) -> Ahead:
        if self._ahead is None:
            self._ahead = Ahead(self._round_trip, self._give_back, self.slot.hold)
        return self._ahead

    @property
    def jobs(self) -> JobSteps:
        if self._jobs is None:
            self._jobs = JobSteps(self.attempts)
        return self._jobs

    def boot(self) -> None:
        """``worker_process_init``: fresh connections after fork; never reuse the parent's sockets."""
        self.bundle = self.bundle.fresh()
        self.attempts = Attempts(self.bundle)
        self.room = Room(self.bundle)
        self.attempts.install()
        self._ahead = None
        self._jobs = None
        registry = self.bundle.registry
        # The process this one replaces may have died mid-task: its tasks go back now. The parent's watchdog does the
        # same, but this process could otherwise take a task (Celery redelivers at once) and overwrite the page first.
        page = self.slot.read()
        if page is not None and page.owner and owner_is_dead(page.owner, self.bundle.host):
            try:
                bury(page, registry.lapse, self.give_back, lambda owner: inventory.held_by(registry, owner))
            except REDIS_ERRORS:  # their leases lapse anyway, later
                log.warning("cannot hand back the tasks of the process this one replaces", exc_info=True)
        self.slot.own(process_owner(self.bundle.host, os.getpid()))
        try:  # what the process this one replaces held of its GPUs (see holds)
            self.bundle.holds.release(always=True)
        except REDIS_ERRORS:
            log.warning("cannot let go of the GPUs the process this one replaces held", exc_info=True)
        # Warm every function now, so the first task does not pay for loading a model; the fleet sees how it went.
        self.bundle.setups.warm_up(self.fleet.functions.values())
        if self.bundle.affinity.on:
            self.bundle.affinity.say()
            _ = self.bundle.lease  # its thread says it again from now on, busy or idle (see ProcessBundle.tally_tick)
        try:  # ready: the supervisor's inventory shows it, and the scaling figure stops counting it as starting
            registry.client.hset(registry.keys.ready, self.bundle.worker_name, os.getppid())
        except REDIS_ERRORS:
            log.warning("cannot mark this worker ready in Redis; it takes tasks anyway", exc_info=True)

    def execute(self, task_id: str, function: str, event: Any, meta: dict[str, Any]) -> None:
        """The Celery task's body: run the delivered task, then the next ones straight from this worker's queues.

        Going back to Celery between two tasks costs its ack, its next fetch and the dispatch to this process: a few
        ms, which on short tasks is GPU time lost. So the next task is claimed while the current one runs, and the
        outcome is written on the way (:mod:`gpufleet.worker.ahead`), the same next message Celery's consumer would
        pop (:meth:`Registry.pop_claim`). When nothing was claimed ahead, the outcome is written in the round trip
        that claims the next; on an empty queue it waits on the queues itself (:meth:`_wait`). After ``DRAIN_S``, or
        once a warm shutdown began, the task returns to Celery, which acknowledges its message. Time limits, cancel
        and leases are per task (see :mod:`gpufleet.worker.watchdog`).
        """
        item = self._take_delivery(task_id, function, event, meta)
        until = time.monotonic() + DRAIN_S
        written: Outcomes | None = None  # the last run's outcomes, for the helper to write
        try:
            while item is not None:
                if not self._hold(item):  # another worker has one of its GPUs: the task went back
                    item = self._wait(until)
                    continue
                claim_in = self._claim_in(item.function) if self._more(until) else None
                if written is not None or claim_in is not None:
                    self.ahead.send(written, claim_in is not None, self._ran, claim_in or 0.0)
                outcomes = Outcomes(self.bundle.registry.pipeline(), [], [])
                self._run_traced(item, outcomes)
                item, written = self.ahead.take(), outcomes
                if item is None:
                    written = None
                    outcomes.build()
                    if not self._more(until):
                        self._commit(outcomes.pipe.execute())
                    else:
                        item = self._next(outcomes.pipe)
                    outcomes.say()
                    if item is None:
                        item = self._wait(until)
        finally:
            # Idle now (or on the way out with an error): nothing for the watchdog to time. A task whose outcome did
            # not reach Redis keeps its lease, which lapses: it runs again.
            left = self.ahead.take()
            if left is not None:
                self._give_back(left)
            self.slot.disarm()
            self.bundle.holds.let_go()

    def _wait(self, until: float) -> Item | None:
        """Idle, within ``DRAIN_S``: wait on the queues' lists for the next message (:meth:`Registry.wait_claim`),
        ``WAIT_SLICE_S`` at a time so as to see a warm shutdown, rather than go back to Celery, whose path to this
        process (its ack, its own BRPOP, the dispatch to the pool process) took ~2 ms more from publish to handler
        start. Meanwhile Celery fetches nothing for this worker: its prefetch is off (``worker_disable_prefetch``)
        and its one pool process is busy with this delivery."""
        b = self.bundle
        if b.setups.failed:
            # Back to Celery, which delivers the failed function's tasks too: each delivery tries its setup() again
            # once its pause is over (see _not_ready). Waiting here, on the other queues, would wait out DRAIN_S.
            return None
        while self._more(until):
            if self.bundle.holds.shared:
                waits, item = self._idle_shared()
                if item is not None:
                    return item
                if waits:
                    time.sleep(min(WAIT_SLICE_S, max(0.0, until - time.monotonic())))
                    continue
            queues = self._turn()
            lists = [priority_list(q, p) for p in reversed(PRIORITY_STEPS) for q in queues]
            if not lists:  # no room for any of its functions now: look again in a moment, not at Celery's pace
                time.sleep(min(WAIT_SLICE_S, max(0.0, until - time.monotonic())))
                continue
            token = owner_token(b.host, os.getpid())
            slice_s = max(0.01, min(WAIT_SLICE_S, until - time.monotonic()))
            try:
                taken = b.registry.wait_claim(lists, slice_s, token, b.lease_s, b.worker_name, b.gpu)
            except REDIS_ERRORS:  # back to Celery, whose consumer reconnects (and a lost pop is scanned for)
                log.warning("cannot wait on the queues; back to Celery", exc_info=True)
                return None
            items = self._items(taken, token)
            if items:
                return items[0]
        return None

    def _hold(self, item: Item) -> bool:
        """Hold this worker's GPUs for ``item`` (see :mod:`gpufleet.worker.holds`), or give it back, unstarted and
        uncounted: another worker has one of them, or is owed it."""
        if self.bundle.holds.take_or_warn():
            return True
        self._give_back(item)
        return False

    def _idle_shared(self) -> tuple[bool, Item | None]:
        """Idle on GPUs that another worker shares: let them go. A multi-GPU worker whose task waits takes them all,
        or reserves them, and claims it: (True, the task), or (True, None) to look again in a moment; (False, None)
        for a worker that waits on its queues as any."""
        holds = self.bundle.holds
        holds.let_go()
        waiting = holds.waiting() if holds.gang else 0
        if not waiting:
            return False, None
        item = self._next(None) if holds.take_or_warn(waiting) else None
        if item is None:
            holds.let_go()
        return True, item

    def _claim_in(self, function: str) -> float | None:
        """When the helper thread claims the next task while ``function`` runs: seconds after it starts (0 for at
        once, behind a short task; ``LEAD_S`` before its last run's length, behind a long one), or None for not at
        all: behind a function never run here, and behind one whose handler held the GIL (pure-Python work), where
        the helper's Python would slow the handler (its spans were 18 % longer) rather than fill a gap."""
        last = self._recent.get(function)
        if last is None or last[1]:
            return None
        return 0.0 if last[0] < HOLD_S else last[0] - LEAD_S

    def _more(self, until: float) -> bool:
        """Whether this run takes another task from the queues: it has queues, within DRAIN_S, no shutdown begun."""
        return bool(self.queues) and not (self.slot.stopping or self.attempts.preempted) and time.monotonic() < until

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
        return self.bundle.registry.hand_back(task_id, token, self.bundle.envelopes, None) == 1

    def _give_back(self, item: Item) -> None:
        if self.give_back(item.task_id, item.token):
            log.info("task claimed ahead given back to the head of its queue", task_id=item.task_id)
        else:
            log.info("a task claimed ahead was taken over or cancelled before it was given back", task_id=item.task_id)

    def _turn(self) -> list[str]:
        """This worker's queues, in the order to read them this time (they take turns being first), less those of a
        function whose setup() failed here or that its GPU has no room for now (and, while any is left out, the pool
        and model queues of older releases, which may hold any function's task: Celery still reads them); with warm
        models, in the order of :class:`~gpufleet.worker.warmup.Affinity`."""
        if self.bundle.holds.yielding():  # a multi-GPU task has (or is owed) one of its GPUs: nothing new
            return []
        self._queues_turn = (self._queues_turn + 1) % len(self.queues)
        queues = self.queues[self._queues_turn :] + self.queues[: self._queues_turn]
        left_out, queue_fn = self.bundle.setups.failed.keys() | self.room.short(), self.bundle.queue_fn
        if left_out:
            queues = [q for q in queues if queue_fn.get(q) not in left_out and q in queue_fn]
        return self.bundle.affinity.arrange(queues)

    def _next(self, pipe: Any) -> Item | None:
        """Write the last outcome (in ``pipe``, if any) and take the next task, in one round trip."""
        queues = self._turn()
        if not queues:
            if pipe is not None:
                self._commit(pipe.execute())
            return None
        while True:
            token = owner_token(self.bundle.host, os.getpid())
            earlier, taken = self._pop_claim(queues, token, pipe)
            self._commit(earlier)
            if not taken:
                return None
            items = self._items(taken, token)
            if items:
                return items[0]
            pipe = None

    def _pop_claim(self, queues: list[str], token: str, pipe: Any = None, n: int = 1) -> tuple[list[Any], list[Any]]:
        b = self.bundle
        return b.registry.pop_claim(queues, token, b.lease_s, b.worker_name, b.gpu, pipe, n=n)

    def _items(self, taken: list[Taken | str], token: str) -> list[Item]:
        """The tasks :meth:`Registry.pop_claim` claimed. Another copy of a task that is not waiting is judged as any
        delivery: dropped, or taken over from an owner that died."""
        items = []
        for got in taken:
            if isinstance(got, Taken):
                items.append(self._waited(Item(got.task_id, got.function, got.event, got.meta, got.claim, token)))
                continue
            claim = self._take_over(got, token, log.bind(task_id=got))
            record = self.bundle.registry.get(got, event=True) if claim is not None else None
            if claim is not None and record is not None:
                meta = record.get("meta") or {}
                items.append(Item(got, record["function"], record.get("event"), meta, claim, token))
        return items

    def _take_delivery(self, task_id: str, function: str, event: Any, meta: dict[str, Any]) -> Item | None:
        """Claim the task Celery delivered: QUEUED and nobody's (one round trip), or taken over from a dead owner."""
        token = owner_token(self.bundle.host, os.getpid())
        try:
            claim = self._claim(task_id, State.QUEUED, "", token)
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
        return self._waited(Item(task_id, function, event, meta, claim, token))

    def _waited(self, item: Item) -> Item:
        """A task claimed from its queue: how long it waited there, for the wait histogram."""
        if item.claim.waited_s is not None:
            self.bundle.tally.observe("wait", item.function, item.claim.waited_s)
        return item

    def _claim(self, task_id: str, state: State, owner: str, token: str) -> Claim:
        b = self.bundle
        return b.registry.claim(task_id, state, owner, token, b.lease_s, b.worker_name, b.gpu)

    def _run_traced(self, item: Item, outcomes: Outcomes) -> None:
        # Every line logged while the task runs (ours, the handler's, its print()s) carries its trace.
        structlog.contextvars.bind_contextvars(**trace.ids(item.meta.get(trace.HEADER)))
        try:
            self._run(item, outcomes)
        finally:
            structlog.contextvars.unbind_contextvars("trace_id", "span_id")
        if self.attempts.broken:  # a CUDA error broke this process's context: its outcomes out, then a fresh one
            outcomes.build()
            self.attempts.recycle(outcomes.pipe)

    def _run(self, item: Item, outcomes: Outcomes) -> None:
        """Run one claimed task (or the batch it starts) as its attempt; outcomes go into ``outcomes``."""
        fn = self.fleet.functions.get(item.function)
        self._ran = [(item.task_id, item.token)]
        if fn is None:
            done = Finisher(
                self.bundle, item.task_id, item.function, item.token, item.event, item.claim, None, pipe=outcomes.pipe
            )
            done.fail(TaskError(f"this worker does not serve function {item.function!r}"), "UnknownFunction")
            return
        if self.bundle.affinity.leave(fn.name, item.claim.waited_s) and self.give_back(item.task_id, item.token):
            return  # back, unstarted, its wait going on: a worker that has its function loaded may take it
        if not self.bundle.setups.ready(fn):
            self._not_ready(item, fn)
            return
        why = self.room.why_not(fn, item.claim.min_room_mb)
        if why is not None:
            # Another GPU may have room: the task goes back to the head of its queue, unstarted and uncounted, and
            # this process goes on with the functions it has room for (see _turn), so it does not take it back. One
            # that needs more room than its function (it ran out of memory where it ran) pauses the function here.
            if item.claim.min_room_mb:
                self.room.pause(fn)
            if self.bundle.registry.hand_back(item.task_id, item.token, self.bundle.envelopes, why, GPU_MEMORY_WAIT):
                log.info("no room on this GPU; task handed back", task_id=item.task_id, why=why)
            return
        if fn.shards is not None:
            self.jobs.run(Attempt(self.attempts, item, fn, outcomes.pipe))
            return
        began, self.attempts.held_gil = time.monotonic(), False
        try:
            if fn.batch is not None:
                items = self._gather(item, fn)
                self._ran = [(i.task_id, i.token) for i in items]
                batch.run(self.attempts, items, fn, outcomes.pipe)
            else:
                Attempt(self.attempts, item, fn, outcomes.pipe).run(outcomes)
        finally:
            self._recent[fn.name] = time.monotonic() - began, self.attempts.held_gil

    def _gather(self, first: Item, fn: Function) -> list[Item]:
        """The batch ``first`` starts, from this worker's queues of ``fn`` (see :func:`batch.gather`)."""
        prefix = self.fleet.settings.redis.key_prefix
        queues = [q for q in self.queues if (parsed := parse_queue(prefix, q)) is not None and parsed[2] == fn.name]
        if not queues:
            return [first]
        limit = self.bundle.batch_fit.limit(fn)
        return batch.gather(first, fn, lambda n: self.take(queues, n, first.token), lambda: self.slot.stopping, limit)

    def _not_ready(self, item: Item, fn: Function) -> None:
        """``fn``'s setup() failed in this process: the task goes back to the head of its queue unstarted (its attempt
        not counted) for a worker where it works, and this one pauses, so as not to take it straight back. The pause
        doubles at each hand-back of the function, up to ``worker.setup_retry_s`` (it was one second, for ever)."""
        b = self.bundle
        why = f"setup() of {fn.name} failed on {b.worker_name}: {b.setups.why(fn)}"
        pause = b.setups.pause(fn, NOT_READY_PAUSE_S)
        if b.registry.hand_back(item.task_id, item.token, b.envelopes, why, "SetupFailed"):
            log.warning("setup() failed here; task handed back", task_id=item.task_id, function=fn.name, pause_s=pause)
        time.sleep(pause)

    def _take_over(self, task_id: str, token: str, bound: Any) -> Claim | None:
        """The task was not QUEUED: drop a duplicate delivery, or take over from an owner that died."""
        record = self.bundle.registry.get(task_id)
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
            if not (lapsed or owner_is_dead(owner, self.bundle.host)):
                bound.info("task is running elsewhere; dropping this delivery", owner=owner)
                return None
            bound.warning("taking over a task whose worker died", owner=owner)
        claim = self._claim(task_id, state, owner, token)
        if not claim.ok:
            bound.info("another delivery claimed the task first", state=claim.seen_state)
            return None
        return claim

    def take(self, queues: list[str], n: int, token: str) -> list[Item]:
        """Up to ``n`` more tasks from ``queues``, claimed under ``token``."""
        _, taken = self._pop_claim(queues, token, n=n)
        return self._items(taken, token)
