"""The worker loop: a pool process takes task after task straight from its queues, and every per-task guarantee
still holds there: time limits (soft and hard), a killed process's task re-queued at once, no hoarding, and Celery's
own tools still see the workers. Real Redis, real worker processes."""

from __future__ import annotations

import multiprocessing
import signal
import time

import pytest

from gpufleet.worker.watchdog import Running, SharedSlot, Watchdog


def _pool_process(slot: SharedSlot, deadline: float, then_exit: bool) -> None:
    # "running" also still listed as claimed ahead: taken since, and started (so not given back uncounted).
    slot.arm([("running", "token-r")], deadline, [("later", "token-l")])  # a batch's event for a later call
    slot.hold([("finished", "token-f")], [("ahead", "token-a"), ("running", "token-r")])
    if not then_exit:
        time.sleep(60)


@pytest.mark.parametrize("how", ["past its hard limit", "dead"])
def test_the_watchdog_hands_back_what_a_pool_process_held_and_times_out_only_what_it_ran(how: str) -> None:
    """What ran (and one finished with its outcome on its way) runs again, its attempt counted; what the process
    claimed but never started goes back uncounted; past the hard limit, only the running task is timed out."""
    slot = SharedSlot()
    deadline = time.time() + (-1 if how == "past its hard limit" else 3600)
    child = multiprocessing.get_context("fork").Process(target=_pool_process, args=(slot, deadline, how == "dead"))
    child.start()
    try:
        timed_out: list[str] = []
        died: list[str] = []
        given_back: list[str] = []
        dog = Watchdog(slot, lambda token: not child.is_alive(), lambda t, _: timed_out.append(t),
                       lambda t, _: died.append(t), lambda t, _: given_back.append(t))  # fmt: skip
        end = time.monotonic() + 10
        while time.monotonic() < end and ((slot.read() or Running((), 0, 0)).held == () or
                                          (how == "dead" and child.is_alive())):  # fmt: skip
            time.sleep(0.02)
        dog.check()
        assert given_back == ["ahead", "later"]
        if how == "dead":
            assert (timed_out, died) == ([], ["running", "finished"])
        else:
            assert (timed_out, died) == (["running"], ["finished"])
            child.join(10)
            assert child.exitcode == -signal.SIGKILL
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)
