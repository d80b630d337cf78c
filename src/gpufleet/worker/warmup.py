"""A GPU worker's warm-up: every function's ``setup()`` runs when its pool process boots, before it takes a task,
and the process says how each went, so that the fleet can tell a version's state (:mod:`gpufleet.scheduling.versions`).

Reported per worker and function, in ``<prefix>:setup``: the version the code declares, ``setup`` while it runs,
then ``ready`` or ``error`` (with the error), and the worker process's pid (an entry of a process that is gone no
longer counts).

A process keeps at most ``worker.warm_functions`` functions loaded (all by default): it sets up the first that many
when it boots, and another when a task of it comes (a cold start, counted and paid by that task's
``setup_seconds``), unloading the least recently used first, and those with tasks waiting for them last (its
``teardown(state)`` hook, then Python's and torch's caches). Its report says which are loaded (``warm``), and a
task waits ``worker.cold_wait_s`` for a worker that has its function loaded before one that has not loads it (see
:class:`ColdQueues`).

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
        # Of some loaded functions, those with tasks waiting (ColdQueues.wanted): unloaded last.
        self.wanted: Callable[[list[str]], set[str]] = lambda names: set()
        self._functions: dict[str, Function] = {}
        self.failed: dict[str, tuple[float, str]] = {}  # function name -> (when it last failed, monotonic; why)
        self._pauses: dict[str, float] = {}  # function name -> the pause after its next hand-back (see pause)
        self._ran: list[tuple[float, float]] = []  # when setup() ran here lately (wall clock): the cold starts

    def warm_up(self, functions: Iterable[Function]) -> None:
        """Run each function's ``setup()`` (the first ``capacity`` of them), reporting as it goes."""
        functions = list(functions)
        self._functions = {fn.name: fn for fn in functions}
        now = functions[: self.capacity] if self.capacity is not None else functions
        later = {fn.name: self._entry(fn, READY) for fn in functions[len(now) :]}  # served: set up when a task comes
        self._say({**{fn.name: self._entry(fn, SETUP if fn.setup_fn else READY) for fn in now}, **later})
        for fn in now:
            if fn.setup_fn is not None:
                self._run(fn)

    def ready(self, fn: Function) -> bool:
        """Whether ``fn`` may run here: its setup() succeeded, or (``retry_s`` after it last failed) succeeds now; an
        unloaded one is loaded now (a cold start), the least recently used unloaded to make room."""
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
        return self.states[fn.name]

    @property
    def served(self) -> list[Function]:
        return list(self._functions.values())

    def _make_room(self, fn: Function) -> None:
        """Unload the least recently used functions until ``fn`` fits (see the module's rule)."""
        loaded = [name for name in self.states if name != fn.name and self._functions.get(name, fn).setup_fn]
        if self.capacity is None or len(loaded) < self.capacity:
            return
        try:  # the least recently used first, those with tasks waiting for them last
            wanted = self.wanted(loaded)
        except REDIS_ERRORS:
            wanted = set()
        loaded.sort(key=lambda name: name in wanted)
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
        return True

    def _entry(self, fn: Function, state: str) -> dict[str, Any]:
        # The worker process the supervisor started, whose pid the inventory shows.
        return {"version": fn.version, "state": state, "pid": os.getppid()}

    def _say(self, report: dict[str, dict[str, Any]]) -> None:
        try:
            report_setup(self.registry, self.worker, report)
        except REDIS_ERRORS:  # a state nobody sees is only a state nobody sees: the worker runs on
            log.warning("cannot report setup() to Redis", exc_info=True)


class ColdQueues:
    """The functions a pool process that keeps fewer loaded than it serves leaves to the workers that have them
    loaded: those it has not loaded whose oldest waiting task has waited less than ``worker.cold_wait_s`` (then it
    loads one: a task never waits longer for its model's worker). Read at most every ``CHECK_S``."""

    CHECK_S = 0.25

    def __init__(self, setups: Setups, registry: Registry, queue_fn: dict[str, str], wait_s: float) -> None:
        self.setups, self.registry, self.queue_fn, self.wait_s = setups, registry, queue_fn, wait_s
        self._looked: tuple[float, set[str]] = (-self.CHECK_S, set())
        setups.wanted = self.wanted

    def left_out(self) -> set[str]:
        if self.setups.capacity is None:
            return set()
        now = time.monotonic()
        if now - self._looked[0] < self.CHECK_S:
            return self._looked[1]
        try:
            cold = {q: f for q, f in self.queue_fn.items() if f in self.cold()}
            left = set(cold.values()) - self._due(cold)
        except REDIS_ERRORS:  # cannot tell: it takes them, as a worker without warm models would
            left = set()
        self._looked = (now, left)
        return left

    def young(self, function: str, waited_s: float | None) -> bool:
        """Whether a task of ``function`` that has waited ``waited_s`` (None: taken over) is left to a worker that has
        it loaded: this process has not, and it has waited less than ``wait_s``."""
        return function in self.cold() and waited_s is not None and waited_s < self.wait_s

    def cold(self) -> set[str]:
        """The functions with a setup() this process serves but has not loaded, when it keeps fewer than it serves."""
        if self.setups.capacity is None:
            return set()
        loaded = self.setups.states
        return {fn.name for fn in self.setups.served if fn.setup_fn is not None and fn.name not in loaded}

    def wanted(self, functions: list[str]) -> set[str]:
        """Of ``functions``, those with tasks waiting in their queues: unloading one costs a cold start soon."""
        queues = [(q, f) for q, f in self.queue_fn.items() if f in functions]
        counts = self.registry.waiting([q for q, _ in queues])
        return {f for (_, f), n in zip(queues, counts, strict=True) if n}

    def _due(self, cold: dict[str, str]) -> set[str]:
        """The cold functions whose oldest waiting task (in any of their queues) has waited ``wait_s``."""
        keys, pipe = self.registry.keys, self.registry.pipeline()
        for queue in cold:
            pipe.zrange(keys.pending(queue), 0, 0)
        heads = [(f, ids[0].decode()) for f, ids in zip(cold.values(), pipe.execute(), strict=True) if ids]
        pipe = self.registry.pipeline()
        for _, task_id in heads:
            pipe.hmget(keys.task(task_id), "queued_at", "created_at")
        now = time.time()
        return {
            f for (f, _), (queued, created) in zip(heads, pipe.execute(), strict=True)
            if now - float(queued or created or now) >= self.wait_s
        }  # fmt: skip
