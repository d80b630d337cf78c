"""The helper thread that claims the next task while one runs (worker/ahead.py), with its round trip faked: when it
claims (at once, late, or not at all) and what a task that ends early does to a late claim."""

from __future__ import annotations

import time
from types import SimpleNamespace
from typing import Any

import pytest

from gpufleet.worker.ahead import HOLD_S, LEAD_S, Ahead
from gpufleet.worker.attempt import Attempts, held_gil
from gpufleet.worker.runtime import Runtime


class Trips:
    """The round trips the helper makes: (outcomes written, claimed, when), and an item for each claim."""

    def __init__(self) -> None:
        self.made: list[tuple[Any, bool, float]] = []
        self.given_back: list[Any] = []

    def round_trip(self, outcomes: Any, claim: bool) -> Any:
        self.made.append((outcomes, claim, time.monotonic()))
        return SimpleNamespace(task_id=f"t{len(self.made)}", token="tok") if claim else None

    def ahead(self) -> Ahead:
        return Ahead(self.round_trip, self.given_back.append, lambda finished, unstarted: None)


def test_a_late_claim_writes_the_outcomes_at_once_and_claims_when_it_was_asked() -> None:
    trips = Trips()
    ahead = trips.ahead()
    sent = time.monotonic()
    ahead.send("outcomes", True, [], claim_in=0.2)
    end = time.monotonic() + 10
    while len(trips.made) < 2 and time.monotonic() < end:  # the running task goes on past the claim
        time.sleep(0.01)
    item = ahead.take()
    assert item is not None and item.task_id == "t2"
    (written, claimed, first), (none, claim, second) = trips.made
    assert (written, claimed, none, claim) == ("outcomes", False, None, True)
    assert first - sent < 0.1 and second - sent >= 0.2


def test_a_task_that_ends_before_its_late_claim_cancels_it() -> None:
    trips = Trips()
    ahead = trips.ahead()
    ahead.send(None, True, [], claim_in=5.0)
    time.sleep(0.05)
    began = time.monotonic()
    assert ahead.take() is None  # at once, not after 5 s: the runtime claims itself
    assert time.monotonic() - began < 1.0 and trips.made == []
    ahead.send(None, True, [])  # the next send works as before
    assert ahead.take() is not None and len(trips.made) == 1


def test_a_task_that_ends_while_the_outcomes_are_still_on_their_way_cancels_the_late_claim_too() -> None:
    """The helper writes the last outcomes first, then waits to claim: a take() during that write must not wait out
    the claim's delay (it stalled the worker for as long as the running task's last run)."""
    trips = Trips()
    slow_write = trips.round_trip

    def round_trip(outcomes: Any, claim: bool) -> Any:
        if outcomes is not None:
            time.sleep(0.2)  # the outcomes' round trip, slow
        return slow_write(outcomes, claim)

    trips.round_trip = round_trip  # type: ignore[method-assign]
    ahead = trips.ahead()
    ahead.send("outcomes", True, [], claim_in=5.0)
    time.sleep(0.05)  # the write is under way
    began = time.monotonic()
    assert ahead.take() is None
    assert time.monotonic() - began < 1.0 and [claim for _, claim, _ in trips.made] == [False]


def test_a_claim_not_taken_within_hold_s_is_given_back() -> None:
    trips = Trips()
    ahead = trips.ahead()
    ahead.send(None, True, [])
    time.sleep(HOLD_S + 0.2)
    assert ahead.take() is None and [i.task_id for i in trips.given_back] == ["t1"]


@pytest.mark.parametrize(
    ("last", "claim_in"),
    [(None, None), ((0.02, False), 0.0), ((0.5, False), 0.5 - LEAD_S), ((0.02, True), None)],
    ids=["never run here", "short", "long: late", "held the GIL"],
)
def test_when_the_next_task_is_claimed_follows_the_function_s_last_run(last: Any, claim_in: float | None) -> None:
    runtime = Runtime.__new__(Runtime)  # _claim_in reads nothing but the last runs
    runtime._recent = {} if last is None else {"f": last}
    assert runtime._claim_in("f") == claim_in


@pytest.mark.parametrize(
    ("took", "cpu", "held"),
    [(0.02, 0.0005, False), (0.02, 0.019, True), (0.02, 0.015, False), (0.001, 0.001, False)],
    ids=["waits", "pure Python", "preempted a quarter of the time", "too short to judge"],
)
def test_a_handler_that_holds_the_gil_is_told_from_one_that_waits(took: float, cpu: float, held: bool) -> None:
    assert held_gil(took, cpu) is held


def test_each_handler_call_is_judged() -> None:
    """guarded() times the call on the clock and on its thread's CPU (a sleep uses none of it: never held)."""
    attempts = Attempts.__new__(Attempts)  # guarded() needs no more of a bundle than a GPU with no memory to read
    attempts.bundle = SimpleNamespace(device=SimpleNamespace(memory=lambda fresh: None))  # type: ignore[assignment]
    attempts._in_handler, attempts.held_gil = False, True
    done = SimpleNamespace(peak_mb=1, ran_s=0.0)
    attempts.guarded(SimpleNamespace(timeout_s=30), lambda: time.sleep(0.02), [done])  # type: ignore[arg-type,list-item]
    assert attempts.held_gil is False and done.peak_mb is None and 0.02 <= done.ran_s < 1  # its GPU time
