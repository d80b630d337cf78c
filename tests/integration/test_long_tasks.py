"""A task of 24 hours keeps its lease and its checkpoint, under a clock that runs ahead: real Redis, the real lease
keeper's thread and the real housekeeping that re-queues a lapsed lease; only Python's clock is virtual.

The keeper's sleeps move the virtual clock on, each by ``STRETCH`` times what it asked for (its 0.5 s are 10 s: a
keeper that always wakes late, still within its 30 s lease; a day is 8,640 renewals rather than 172,800), and
another supervisor's housekeeping runs at every virtual minute, as it does every second for real. A renewal missed,
or written on a wrong clock, lets the lease lapse there, and the task is re-queued under its owner's feet.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

from gpufleet.functions import MAX_TIMEOUT_S
from gpufleet.registry import store
from gpufleet.registry.checkpoints import Checkpoints
from gpufleet.registry.model import State
from gpufleet.worker import lease
from gpufleet.worker.lease import LeaseKeeper
from tests.harness import FleetHarness
from tests.integration.test_registry import enqueue, envelopes

DAY_S = float(MAX_TIMEOUT_S)
LEASE_S = 30.0
STRETCH = 20.0


class VirtualClock:
    """``time`` as the modules under test see it: ``sleep(s)`` moves the clock on by ``s`` x ``stretch`` at once, then
    runs what falls due; everything else is the real module's."""

    def __init__(self, stretch: float) -> None:
        self.stretch = stretch
        self.now = time.time()
        self._every: list[tuple[float, Any]] = []  # (period, what), run when the clock passes a multiple of period
        self._lock = threading.Lock()

    def every(self, period_s: float, what: Any) -> None:
        self._every.append((period_s, what))

    def time(self) -> float:
        return self.now

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        with self._lock:
            before, self.now = self.now, self.now + seconds * self.stretch
            for period, what in self._every:
                if before // period != self.now // period:
                    what()
        time.sleep(0)  # let the test's own thread look in

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


def test_a_day_long_task_keeps_its_lease_and_its_checkpoint(
    harness: FleetHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    reg = harness.registry
    clock = VirtualClock(STRETCH)
    monkeypatch.setattr(lease, "time", clock)
    monkeypatch.setattr(store, "time", clock)
    enqueue(harness, "day")
    token = "host/1/1/day"
    assert reg.claim("day", State.QUEUED, "", token, LEASE_S, "gpu0@host", "gpu0:virtual").ok
    started = clock.now
    saved = Checkpoints(reg, lambda: pytest.fail("no object store here"), None, reg.retention_s + MAX_TIMEOUT_S)
    saved.save("day", token, {"step": 1})

    reaped: list[tuple[float, int]] = []
    done = threading.Event()

    def other_supervisor() -> None:
        _, n = reg.housekeep(envelopes(harness))
        if n:
            reaped.append((clock.now - started, n))
        if clock.now - started >= stop_at[0]:
            done.set()

    stop_at = [DAY_S]
    clock.every(60.0, other_supervisor)
    keeper = LeaseKeeper(reg, LEASE_S, 10.0, lambda task_id, token: None)
    keeper.hold([("day", token)])
    keeper.start()
    assert done.wait(120), "the virtual day did not pass"
    assert reaped == [], f"the lease lapsed under its running owner at {reaped}"
    record = reg.get("day")
    assert record is not None and record["state"] == "RUNNING" and record["token"] == token
    assert float(record["lease_until"]) > clock.now
    # Its checkpoint outlives the longest task and the record's retention after it.
    ttl = reg.client.ttl(reg.keys.checkpoint("day"))
    assert ttl >= MAX_TIMEOUT_S + reg.retention_s - 60, ttl
    assert saved.load("day") == {"step": 1}

    # The control: an owner that stops renewing (dead, frozen) loses the task within a lease and a minute. The clock
    # ran on while the checks above were made: the time counts from the release (a renewal then in flight adds one
    # sleep).
    done.clear()
    released = clock.now - started
    stop_at[0] = released + LEASE_S + 120
    keeper.release()
    assert done.wait(60)
    assert len(reaped) == 1 and released < reaped[0][0] <= released + 10 + LEASE_S + 60, (released, reaped)
    assert reg.get("day")["state"] == "QUEUED"  # type: ignore[index]
