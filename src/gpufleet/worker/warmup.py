"""A GPU worker's warm-up: every function's ``setup()`` runs when its pool process boots, before it takes a task,
and the process says how each went, so that the fleet can tell a version's state (:mod:`gpufleet.versions`).

Reported per worker and function, in ``<prefix>:setup``: the version the code declares, ``setup`` while it runs,
then ``ready`` or ``error`` (with the error), and the worker process's pid (an entry of a process that is gone no
longer counts). A setup that fails is tried again by the first task that needs it, which then fails with the error.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import Any

import structlog

from gpufleet.functions import Function
from gpufleet.registry import REDIS_ERRORS, Registry
from gpufleet.versions import ERROR, READY, SETUP, report_setup

log = structlog.get_logger("gpufleet.worker")


def warm_up(functions: Iterable[Function], registry: Registry, worker: str, states: dict[str, Any]) -> None:
    """Run each function's ``setup()`` into ``states`` (function name -> what it returned), reporting as it goes."""
    pid = os.getppid()  # the worker process the supervisor started, whose pid the inventory shows
    report = {fn.name: {"version": fn.version, "state": SETUP if fn.setup_fn else READY, "pid": pid}
              for fn in functions}  # fmt: skip
    _say(registry, worker, report)
    for fn in functions:
        if fn.setup_fn is None:
            continue
        try:
            states[fn.name] = fn.setup_fn()
            report[fn.name]["state"] = READY
        except Exception as exc:  # reported; the first task that needs it raises it again
            log.exception("setup failed", function=fn.name, version=fn.version)
            report[fn.name] |= {"state": ERROR, "error": f"{type(exc).__name__}: {exc}"[:2000]}
        _say(registry, worker, {fn.name: report[fn.name]})


def _say(registry: Registry, worker: str, report: dict[str, dict[str, Any]]) -> None:
    try:
        report_setup(registry, worker, report)
    except REDIS_ERRORS:  # a state nobody sees is only a state nobody sees: the worker runs on
        log.warning("cannot report setup() to Redis", exc_info=True)
