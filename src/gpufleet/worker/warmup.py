"""A GPU worker's warm-up: every function's ``setup()`` runs when its pool process boots, before it takes a task,
and the process says how each went, so that the fleet can tell a version's state (:mod:`gpufleet.scheduling.versions`).

Reported per worker and function, in ``<prefix>:setup``: the version the code declares, ``setup`` while it runs,
then ``ready`` or ``error`` (with the error), and the worker process's pid (an entry of a process that is gone no
longer counts).

A function whose setup() failed here is not ready here: its tasks go back to their queue unstarted, their attempt
not counted, for a worker where it works (or they wait, as for a version no live worker runs: its state is ERROR).
A task that arrives at least ``worker.setup_retry_s`` after the last try runs setup() again first: a model file that
appears, a device that frees up, and the worker serves the function again.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import Any

import structlog

from gpufleet.functions import Function
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry
from gpufleet.scheduling.versions import ERROR, READY, SETUP, report_setup

log = structlog.get_logger("gpufleet.worker")


class Setups:
    """Each function's setup() in one pool process: what it returned, or when it last failed."""

    def __init__(self, registry: Registry, worker: str, retry_s: float) -> None:
        self.registry = registry
        self.worker = worker
        self.retry_s = retry_s
        self.states: dict[str, Any] = {}  # function name -> what its setup() returned
        self.failed: dict[str, tuple[float, str]] = {}  # function name -> (when it last failed, monotonic; why)
        self._pauses: dict[str, float] = {}  # function name -> the pause after its next hand-back (see pause)
        self._ran: list[tuple[float, float]] = []  # when setup() ran here lately (wall clock): the cold starts

    def warm_up(self, functions: Iterable[Function]) -> None:
        """Run each function's ``setup()``, reporting as it goes."""
        functions = list(functions)
        self._say({fn.name: self._entry(fn, SETUP if fn.setup_fn else READY) for fn in functions})
        for fn in functions:
            if fn.setup_fn is not None:
                self._run(fn)

    def ready(self, fn: Function) -> bool:
        """Whether ``fn`` may run here: its setup() succeeded, or (``retry_s`` after it last failed) succeeds now."""
        if fn.name not in self.failed:
            return True
        if time.monotonic() - self.failed[fn.name][0] < self.retry_s:
            return False
        return self._run(fn)

    def state_of(self, fn: Function) -> Any:
        """What ``fn``'s setup() returned in this process (run now, if it has not run yet)."""
        if fn.name not in self.states:
            self.states[fn.name] = fn.setup_fn() if fn.setup_fn else None
        return self.states[fn.name]

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
        self._say({fn.name: self._entry(fn, READY)})
        return True

    def _entry(self, fn: Function, state: str) -> dict[str, Any]:
        # The worker process the supervisor started, whose pid the inventory shows.
        return {"version": fn.version, "state": state, "pid": os.getppid()}

    def _say(self, report: dict[str, dict[str, Any]]) -> None:
        try:
            report_setup(self.registry, self.worker, report)
        except REDIS_ERRORS:  # a state nobody sees is only a state nobody sees: the worker runs on
            log.warning("cannot report setup() to Redis", exc_info=True)
