"""A GPU worker's warm-up: every function's ``setup()`` runs when its pool process boots, before it takes a task,
and the process says how each went, so that the fleet can tell a version's state (:mod:`gpufleet.scheduling.versions`).

Reported per worker and function, in ``<prefix>:setup``: the version the code declares, ``setup`` while it runs,
then ``ready`` or ``error`` (with the error), and the worker process's pid (an entry of a process that is gone no
longer counts).

A process keeps at most ``worker.warm_functions`` functions loaded (all by default): it sets up the first that many
when it boots, and another when a task of it comes (a cold start, counted and paid by that task's
``setup_seconds``). To make room it unloads (its ``teardown(state)`` hook, then Python's and torch's caches) first
a function another worker has loaded too, last one with tasks waiting for it, and otherwise the one it ran fewest
tasks of lately, then the least recently used. Its report says which are loaded (``warm``), and :class:`Affinity`
routes each task to a worker that has its function loaded, for at most ``worker.cold_wait_s``.

A function whose setup() failed here is not ready here: its tasks go back to their queue unstarted, their attempt
not counted, for a worker where it works (or they wait, as for a version no live worker runs: its state is ERROR).
A task that arrives at least ``worker.setup_retry_s`` after the last try runs setup() again first: a model file that
appears, a device that frees up, and the worker serves the function again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable
from typing import Any

import structlog

from gpufleet.errors import TaskError
from gpufleet.functions import Function
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry
from gpufleet.registry.tally import Tally
from gpufleet.scheduling.versions import ERROR, READY, SETUP, report_setup
from gpufleet.worker.gpufaults import free_caches

log = structlog.get_logger("gpufleet.worker")

USE_DECAY = 0.98  # how much a function's use here counts for less at each task run: about the last 50 tasks


class Setups:
    """Each function's setup() in one pool process: what it returned, or when it last failed."""

    def __init__(
        self, registry: Registry, worker: str, retry_s: float, capacity: int | None = None, tally: Tally | None = None
    ) -> None:
        self.registry = registry
        self.tally = tally  # where a cold start's setup() time goes (gpufleet_cold_start_seconds)
        self.worker = worker
        self.retry_s = retry_s
        self.capacity = capacity  # functions loaded at once; None: every one
        self.states: dict[str, Any] = {}  # function name -> what its setup() returned, least recently used first
        # What unloading each of some loaded functions would cost (Affinity.keep): the cheapest unloaded first.
        self.keep: Callable[[list[str]], dict[str, int]] = lambda names: {}
        self.changed: Callable[[], None] = lambda: None  # a function loaded or unloaded (Affinity.say)
        self.used: dict[str, float] = {}  # function name -> tasks run here lately, each older one counting less
        self._functions: dict[str, Function] = {}
        self.failed: dict[str, tuple[float, str]] = {}  # function name -> (when it last failed, monotonic; why)
        self._pauses: dict[str, float] = {}  # function name -> the pause after its next hand-back (see pause)
        self._ran: list[tuple[float, float]] = []  # when setup() ran here lately (wall clock): the cold starts

    def warm_up(self, functions: Iterable[Function]) -> None:
        """Run each function's ``setup()`` (the first ``capacity`` of those that have one), reporting as it goes."""
        functions = list(functions)
        self._functions = {fn.name: fn for fn in functions}
        models = [fn for fn in functions if fn.setup_fn is not None]  # a function without one takes no room
        now = models[: self.capacity] if self.capacity is not None else models
        later = {fn.name: self._entry(fn, READY) for fn in functions if fn not in now}  # set up when a task comes
        self._say({**{fn.name: self._entry(fn, SETUP) for fn in now}, **later})
        for fn in now:
            self._run(fn)

    def ready(self, fn: Function) -> bool:
        """Whether ``fn`` may run here: its setup() succeeded, or (``retry_s`` after it last failed) succeeds now; an
        unloaded one is loaded now (a cold start), another unloaded to make room."""
        if fn.name in self.failed:
            return time.monotonic() - self.failed[fn.name][0] >= self.retry_s and self._run(fn)
        if fn.setup_fn is None or fn.name in self.states:
            return True
        log.info("cold start: loading a function", function=fn.name, loaded=list(self.states))
        began = time.monotonic()
        loaded = self._run(fn)
        if self.tally is not None:
            self.tally.observe("cold", fn.name, time.monotonic() - began)
        return loaded

    def state_of(self, fn: Function) -> Any:
        """What ``fn``'s setup() returned in this process (run now, if it has not run yet), now its most recently
        used."""
        if fn.name not in self.states:
            if fn.setup_fn is None:
                self.states[fn.name] = None
            elif not self._run(fn):
                raise TaskError(f"setup() of {fn.name} failed: {self.why(fn)}")
        self.states[fn.name] = self.states.pop(fn.name)
        self.used = {name: n * USE_DECAY for name, n in self.used.items() if n > 0.01}
        self.used[fn.name] = self.used.get(fn.name, 0.0) + 1
        return self.states[fn.name]

    @property
    def served(self) -> list[Function]:
        return list(self._functions.values())

    def _make_room(self, fn: Function) -> None:
        """Unload functions until ``fn`` fits (see the module's rule)."""
        loaded = [name for name in self.states if name != fn.name and self._functions.get(name, fn).setup_fn]
        if self.capacity is None or len(loaded) < self.capacity:
            return
        # Those whose unloading costs least first (Affinity.keep), then the least used here lately, then the least
        # recently used (the order of states).
        cost, order = self.keep(loaded), {name: i for i, name in enumerate(loaded)}
        loaded.sort(key=lambda name: (cost.get(name, 1), self.used.get(name, 0.0), order[name]))
        while loaded and len(loaded) >= self.capacity:
            name = loaded.pop(0)
            state, unloaded = self.states.pop(name), self._functions[name]
            if unloaded.teardown_fn is not None:
                try:
                    unloaded.teardown_fn(state)
                except Exception:  # unloaded all the same: what it held goes with the reference
                    log.exception("teardown failed", function=name)
            del state
            free_caches()
            log.info("function unloaded to make room", function=name, for_function=fn.name)
            self._say({name: {**self._entry(unloaded, READY), "warm": False}})
            self.changed()

    def pause(self, fn: Function, first_s: float) -> float:
        """How long to pause after handing back a task of ``fn``, whose setup() failed: ``first_s``, doubling at each
        hand-back up to ``retry_s``, and ``first_s`` again once setup() has succeeded."""
        pause = self._pauses.get(fn.name, first_s)
        self._pauses[fn.name] = min(pause * 2, max(first_s, self.retry_s))
        return pause

    def paid(self, since: float, until: float) -> float:
        """Seconds of ``[since, until]`` (a task's wait) this process spent in setup(): the cold start it paid."""
        return sum(max(0.0, min(end, until) - max(start, since)) for start, end in self._ran)

    def why(self, fn: Function) -> str:
        return self.failed.get(fn.name, (0.0, ""))[1]

    def _run(self, fn: Function) -> bool:
        assert fn.setup_fn is not None
        self._make_room(fn)
        began = time.time()
        try:
            self.states[fn.name] = fn.setup_fn()
        except Exception as exc:  # reported, and the function's tasks go where it works
            log.exception("setup failed", function=fn.name, version=fn.version)
            error = f"{type(exc).__name__}: {exc}"[:2000]
            self.failed[fn.name] = (time.monotonic(), error)
            self._say({fn.name: {**self._entry(fn, ERROR), "error": error}})
            return False
        finally:
            self._ran = [*self._ran[-31:], (began, time.time())]
        self._pauses.pop(fn.name, None)
        if self.failed.pop(fn.name, None) is not None:
            log.info("setup succeeded on a later try", function=fn.name, version=fn.version)
        self._say({fn.name: {**self._entry(fn, READY), "warm": True}})
        self.changed()
        return True

    def _entry(self, fn: Function, state: str) -> dict[str, Any]:
        # The worker process the supervisor started, whose pid the inventory shows.
        return {"version": fn.version, "state": state, "pid": os.getppid()}

    def _say(self, report: dict[str, dict[str, Any]]) -> None:
        try:
            report_setup(self.registry, self.worker, report)
        except REDIS_ERRORS:  # a state nobody sees is only a state nobody sees: the worker runs on
            log.warning("cannot report setup() to Redis", exc_info=True)


class Affinity:
    """The order in which a pool process that keeps fewer functions loaded than it serves reads its queues (within a
    priority level, as pop_claim.lua reads them), so that a task goes to a worker that has its function loaded, and a
    cold function's task never waits long:

    1. the queues of functions it has loaded whose oldest task has waited ``worker.cold_wait_s``;
    2. those of functions it has not loaded whose oldest task has waited that long, or twice that long where another
       worker has the function loaded (it loads one: a cold start);
    3. those of the functions it has loaded;
    4. those of functions no live worker has loaded: someone must load it, and this process has nothing warm to do.

    It leaves out the queues of functions another worker has loaded until their oldest task has waited twice
    ``cold_wait_s``: that worker takes them without a cold start, first of all once they have waited ``cold_wait_s``
    (rule 1), so only a worker busy with a long task leaves them to another. Each process says which of its queues'
    functions it has loaded in ``P:warm:<queue>`` (worker -> when it last said so): every ``SAY_S`` from its lease
    keeper's thread, busy or idle, and at once when it loads or unloads one. An entry older than ``FRESH_S`` is a
    worker gone, whose functions count as loaded nowhere. ``cold_wait_s: 0`` turns routing off: the queues are read
    as they come, as a worker that knows nothing of warm models reads them. Redis is read at most every ``CHECK_S``."""

    CHECK_S = 0.25
    SAY_S = 1.0
    FRESH_S = 5.0
    FORGET_S = 3600.0  # an entry this old (its worker gone for good) is dropped

    def __init__(self, setups: Setups, registry: Registry, queue_fn: dict[str, str], wait_s: float) -> None:
        self.setups, self.registry, self.queue_fn, self.wait_s = setups, registry, queue_fn, wait_s
        self._looked = self._said = -self.CHECK_S
        self._due: set[str] = set()  # queues whose oldest task has waited wait_s
        self._late: set[str] = set()  # queues whose oldest task has waited twice wait_s
        self._waiting: set[str] = set()  # functions with tasks waiting in a queue of this worker
        self._elsewhere: set[str] = set()  # functions another live worker has loaded
        setups.keep, setups.changed = self.keep, self.say

    @property
    def on(self) -> bool:
        return self.setups.capacity is not None and self.wait_s > 0

    def arrange(self, queues: list[str]) -> list[str]:
        """``queues`` (only those of one function each) in the order of the class's rule, less those left to other
        workers; as they are when routing is off, or Redis cannot say."""
        if not self.on or not self._look():
            return queues
        cold = self.cold()
        ranks = {}
        for queue in queues:
            fn = self.queue_fn.get(queue)
            if fn is None:
                continue
            due = queue in self._due
            if fn not in cold:
                ranks[queue] = 0 if due else 2
            elif fn not in self._elsewhere:
                ranks[queue] = 1 if due else 3
            elif queue in self._late:
                ranks[queue] = 1
        return sorted(ranks, key=ranks.__getitem__)  # stable: the queues' turns hold within each rank

    def leave(self, function: str, waited_s: float | None) -> bool:
        """Whether a task of ``function`` that has waited ``waited_s`` (None: taken over), delivered to this process,
        goes back to its queue, unstarted, as :meth:`arrange` would leave it: this process has not loaded its
        function, and another worker has (it has waited less than twice ``cold_wait_s``), or this one has tasks of its
        own loaded functions waiting (it has waited less than ``cold_wait_s``)."""
        if not self.on or waited_s is None or waited_s >= 2 * self.wait_s or function not in self.cold():
            return False
        if not self._look():
            return False
        return function in self._elsewhere or (waited_s < self.wait_s and bool(self._waiting - self.cold()))

    def cold(self) -> set[str]:
        """The functions with a setup() this process serves but has not loaded."""
        loaded = self.setups.states
        return {fn.name for fn in self.setups.served if fn.setup_fn is not None and fn.name not in loaded}

    def keep(self, functions: list[str]) -> dict[str, int]:
        """How much unloading each of ``functions`` would cost, as of the last look: 2, tasks wait for it (a cold
        start soon); 1, no other worker has it loaded; 0, another has."""
        return {f: 2 if f in self._waiting else 0 if f in self._elsewhere else 1 for f in functions}

    def tick(self) -> None:
        """Say again which functions this process has loaded, at most every ``SAY_S`` (from the lease keeper's
        thread): one ZADD per queue of a loaded function."""
        if self.on and time.monotonic() - self._said >= self.SAY_S:
            self.say(full=False)

    def say(self, full: bool = True) -> None:
        """Say which of this process's functions it has loaded now (with routing on), and with ``full`` (at boot, and
        when it loads or unloads one) which not, dropping the entries of workers gone for ``FORGET_S``."""
        if not self.on:
            return
        keys, me, now = self.registry.keys, self.setups.worker, time.time()
        loaded = {fn.name for fn in self.setups.served if fn.setup_fn is not None and fn.name in self.setups.states}
        try:
            pipe = self.registry.pipeline()
            for queue, fn in self.queue_fn.items():
                if fn in loaded:
                    pipe.zadd(keys.warm(queue), {me: now})
                elif full:
                    pipe.zrem(keys.warm(queue), me)
                    pipe.zremrangebyscore(keys.warm(queue), "-inf", now - self.FORGET_S)
            pipe.execute()
        except REDIS_ERRORS:  # its entries age out; said again at the next tick
            log.warning("cannot say which functions are loaded here", exc_info=True)
        self._said = time.monotonic()

    def _look(self) -> bool:
        """Read which queues are due and which functions other workers have loaded: two round trips, at most every
        CHECK_S. False when Redis cannot say."""
        now = time.monotonic()
        if now - self._looked < self.CHECK_S:
            return True
        keys, me, wall, queues = self.registry.keys, self.setups.worker, time.time(), list(self.queue_fn)
        try:
            pipe = self.registry.pipeline()
            for queue in queues:
                pipe.zrangebyscore(keys.warm(queue), wall - self.FRESH_S, "+inf", start=0, num=2)
                pipe.zrange(keys.pending(queue), 0, 0)
            answers = pipe.execute()
            heads, elsewhere = {}, set()
            for queue, warm, head in zip(queues, answers[::2], answers[1::2], strict=True):
                if any(w.decode() != me for w in warm):
                    elsewhere.add(self.queue_fn[queue])
                if head:
                    heads[queue] = head[0].decode()
            pipe = self.registry.pipeline()
            for task_id in heads.values():
                pipe.hmget(keys.task(task_id), "queued_at", "created_at")
            since = dict(zip(heads, pipe.execute() if heads else [], strict=True))
        except REDIS_ERRORS:  # cannot tell: the queues as they come, as a worker without warm models reads them
            return False
        waited = {q: wall - float(at or created or wall) for q, (at, created) in since.items()}
        self._due = {q for q, w in waited.items() if w >= self.wait_s}
        self._late = {q for q, w in waited.items() if w >= 2 * self.wait_s}
        self._waiting = {self.queue_fn[q] for q in heads}
        self._elsewhere, self._looked = elsewhere, now
        return True
