"""Retrying an operation until it succeeds or the caller is told to stop: for servers that come and go."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import structlog

from gpufleet.errors import GpufleetError

log = structlog.get_logger("gpufleet.retry")


def retry_until(
    op: Callable[[], Any],
    stop: threading.Event,
    what: str,
    max_backoff_s: float = 10.0,
    transient: tuple[type[BaseException], ...] = (),
    hint: str | None = None,
) -> bool:
    """Run ``op`` until it succeeds, backing off (0.1 s, doubling to ``max_backoff_s``) on retriable errors: a
    :class:`GpufleetError` whose class says ``retriable``, or one of ``transient`` (a client library's own, such as
    redis-py's connection errors). Each failure is one log line, with ``hint`` (what to check) when given. False if
    ``stop`` is set first."""
    delay = 0.1
    extra = {"hint": hint} if hint else {}
    while True:
        try:
            op()
            return True
        except GpufleetError as exc:
            if not exc.retriable:
                raise
            log.warning(f"{what} failed; retrying", error=str(exc), retry_in_s=delay, **extra)
        except transient as exc:
            log.warning(f"{what} failed; retrying", error=str(exc), retry_in_s=delay, **extra)
        if stop.wait(delay):
            return False
        delay = min(max_backoff_s, delay * 2)
