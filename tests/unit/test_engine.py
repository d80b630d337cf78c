"""The worker loop: a pool process takes task after task straight from its queues, and every per-task guarantee
still holds there: time limits (soft and hard), a killed process's task re-queued at once, no hoarding, and Celery's
own tools still see the workers. Real Redis, real worker processes."""

from __future__ import annotations

import multiprocessing
import signal
import time

import pytest

from gpufleet.worker.watchdog import Running, SharedSlot, Watchdog

OWNER = "host/123/456/"  # what every token of the pool process starts with


def _pool_process(slot: SharedSlot, deadline: float, then_exit: bool) -> None:
    # "running" also still listed as claimed ahead: taken since, and started (so not given back uncounted).
    slot.arm([("running", f"{OWNER}r")], deadline, [("later", f"{OWNER}l")], [("ran", f"{OWNER}x")])  # a batch's
    slot.hold([("finished", f"{OWNER}f")], [("ahead", f"{OWNER}a"), ("running", f"{OWNER}r")])
    if not then_exit:
        time.sleep(60)


def held_in_redis(owner: str) -> list[tuple[str, str]]:
    """What Redis lists RUNNING under ``owner``: all the page lists, and a claim on its way back when it died."""
    assert owner == OWNER
    listed = [("running", "r"), ("finished", "f"), ("ran", "x"), ("ahead", "a"), ("later", "l"), ("stray", "s")]
    return [(task_id, f"{OWNER}{nonce}") for task_id, nonce in listed]


@pytest.mark.parametrize("how", ["past its hard limit", "dead"])
def test_the_watchdog_hands_back_what_a_pool_process_held_and_times_out_only_what_it_ran(how: str) -> None:
    """What ran (and one finished with its outcome on its way) runs again, its attempt counted; what the process
    claimed but never started goes back uncounted, a claim the page does not list yet included; past the hard limit,
    only the running task is timed out, and the rest is handled once the process is seen dead."""
    slot = SharedSlot()
    deadline = time.time() + (-1 if how == "past its hard limit" else 3600)
    child = multiprocessing.get_context("fork").Process(target=_pool_process, args=(slot, deadline, how == "dead"))
    child.start()
    try:
        timed_out: list[str] = []
        died: list[str] = []
        given_back: list[str] = []
        dog = Watchdog(slot, lambda owner: owner == OWNER and not child.is_alive(), lambda t, _: timed_out.append(t),
                       lambda t, _: died.append(t), lambda t, _: given_back.append(t), held_in_redis)  # fmt: skip
        end = time.monotonic() + 10
        while time.monotonic() < end and ((slot.read() or Running((), 0, 0)).held == () or
                                          (how == "dead" and child.is_alive())):  # fmt: skip
            time.sleep(0.02)
        dog.check()
        if how == "past its hard limit":
            assert (timed_out, died, given_back) == (["running"], [], [])
            child.join(10)
            assert child.exitcode == -signal.SIGKILL
            dog.check()
        assert given_back == ["ahead", "later", "stray"]
        assert died == ["running", "ran", "finished"]
        assert timed_out == ([] if how == "dead" else ["running"])
        dog.check()  # handled once
        assert len(given_back) == 3
    finally:
        if child.is_alive():
            child.kill()
        child.join(10)


def test_the_watchdog_sees_an_idle_pool_process_die_with_a_claim_on_its_way() -> None:
    """Between two runs the page lists nothing, but still names its process: a claim it made as it died goes back
    uncounted; a task of another process is left alone."""
    slot = SharedSlot()
    child = multiprocessing.get_context("fork").Process(target=_idle_pool_process, args=(slot,))
    child.start()
    child.join(10)
    given_back: list[tuple[str, str]] = []
    page = slot.read()
    assert page is not None and (page.all, page.owner) == ((), OWNER)
    other = "host/999/456/z"
    in_redis = [("stray", f"{OWNER}s"), ("theirs", other)]
    dog = Watchdog(
        slot,
        lambda owner: True,
        lambda t, _: None,
        lambda t, _: None,
        lambda t, k: given_back.append((t, k)),
        lambda owner: [(t, k) for t, k in in_redis if k.startswith(owner)],
    )
    dog.check()
    assert given_back == [("stray", f"{OWNER}s")]


def _idle_pool_process(slot: SharedSlot) -> None:
    slot.own(OWNER)
    slot.arm([("done", f"{OWNER}d")], time.time() + 60)
    slot.disarm()
