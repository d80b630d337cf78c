"""Task lifecycle on real servers and worker processes: cancel, expiry, retry, queue position, lost workers."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.errors import ConflictError, NotFoundError
from tests.harness import FleetHarness


def control(h: FleetHarness) -> ControlPlane:
    return ControlPlane(h.fleet())


def state_of(cp: ControlPlane, task_id: str) -> str:
    return str(cp.status(task_id)["state"])


def wait_state(h: FleetHarness, cp: ControlPlane, task_id: str, state: str, timeout_s: float = 60) -> dict:
    h.wait_for(lambda: state_of(cp, task_id) == state, timeout_s, f"{task_id} {state}")
    return cp.status(task_id)


def occupy_both_slots(h: FleetHarness, cp: ControlPlane, seconds: float) -> list[str]:
    ids = [cp.invoke("slow", {"seconds": seconds}).id for _ in range(2)]
    for task_id in ids:
        wait_state(h, cp, task_id, "RUNNING")
    return ids


def test_queue_position_cancel_while_queued_and_expiry(harness: FleetHarness) -> None:
    harness.write_config(worker={"virtual_gpus": 2})
    harness.start()
    cp = control(harness)
    busy = occupy_both_slots(harness, cp, seconds=6)
    queued = [cp.invoke("slow", {"seconds": 0.5}).id for _ in range(4)]
    expired = cp.invoke("expiring", {}).id  # max_event_age_s=1: it cannot start before the slots free up
    assert [cp.position(i)["position"] for i in queued] == [1, 2, 3, 4]
    assert cp.queue("slow")["summary"] == {"queued": 4, "running": 2, "completed": 0, "failed": 0, "cancelled": 0}

    # Cancel while queued: at once, out of the queue, and the tasks behind it move up.
    assert cp.cancel(queued[1]) == {"id": queued[1], "outcome": "cancelled", "state": "CANCELLED"}
    assert [cp.position(i)["position"] for i in queued] == [1, None, 2, 3]
    assert cp.position(queued[1])["state"] == "CANCELLED"
    assert cp.cancel(queued[1])["outcome"] == "noop"  # a finished task: a clear no-op, not an error

    # Position of the last one only ever decreases, down to "started".
    last, seen = queued[3], []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        pos = cp.position(last)["position"]
        if not seen or seen[-1] != pos:
            seen.append(pos)
        if pos is None:
            break
        time.sleep(0.05)
    assert seen[-1] is None and len(seen) >= 2, seen
    positions = [p for p in seen if p is not None]
    assert positions == sorted(positions, reverse=True), seen

    for task_id in [*busy, queued[0], queued[2], queued[3]]:
        wait_state(harness, cp, task_id, "SUCCEEDED")
    expired_view = wait_state(harness, cp, expired, "EXPIRED")
    assert expired_view["error"]["errorType"] == "EventAgeExceeded" and expired_view["condition"] == "EventAgeExceeded"
    assert harness.runs(queued[1]) == 0 and harness.runs(expired) == 0  # neither ever started

    failures = {r["key"]: r for r in harness.records("failure", 2)}
    assert failures[queued[1]]["headers"]["condition"] == "Cancelled"
    assert failures[queued[1]]["value"]["requestPayload"] == {"seconds": 0.5}
    assert failures[expired]["value"]["requestContext"]["condition"] == "EventAgeExceeded"
    assert cp.queue("slow")["summary"] == {"queued": 0, "running": 0, "completed": 5, "failed": 0, "cancelled": 1}


def test_cancel_running_cooperative_and_uncooperative(harness: FleetHarness) -> None:
    harness.start()
    cp = control(harness)
    coop = cp.invoke("coop", {"seconds": 60}).id
    view = wait_state(harness, cp, coop, "RUNNING")
    harness.wait_for(lambda: cp.status(coop)["progress"]["message"] == "half way", 10, "progress")
    assert cp.status(coop)["progress"]["fraction"] == 0.5
    gpus = harness.wait_for(lambda: [g for g in cp.gpus() if g["task_id"] == coop], 10, "inventory")
    assert gpus[0]["worker"] == view["worker"] and gpus[0]["up"] is True

    assert cp.cancel(coop) == {"id": coop, "outcome": "cancelling", "state": "RUNNING"}
    done = wait_state(harness, cp, coop, "CANCELLED", timeout_s=10)
    assert "returned early" in done["error"]["errorMessage"]

    # A handler that ignores the cancel is killed after cancel_grace_s (2 s here); the task is not re-run.
    stubborn = cp.invoke("ignores_cancel", {"seconds": 60}).id
    wait_state(harness, cp, stubborn, "RUNNING")
    pid = int(harness.wait_for(lambda: harness.redis.get(f"pid:{stubborn}"), 10, "pid"))
    assert cp.cancel(stubborn)["outcome"] == "cancelling"
    killed = wait_state(harness, cp, stubborn, "CANCELLED", timeout_s=15)
    assert "process was killed" in killed["error"]["errorMessage"]
    harness.wait_for(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", 10, "kill")

    # The worker comes back and the next tasks run; the killed task's message is dropped, not run again.
    after = [cp.invoke("echo", {"n": i}).id for i in range(4)]
    for task_id in after:
        wait_state(harness, cp, task_id, "SUCCEEDED")
    time.sleep(1)
    assert harness.runs(stubborn) == 1 and state_of(cp, stubborn) == "CANCELLED"
    conditions = {r["key"]: r["headers"]["condition"] for r in harness.records("failure", 2)}
    assert conditions == {coop: "Cancelled", stubborn: "Cancelled"}


def test_retry_of_a_failed_task_and_what_cannot_be_retried(harness: FleetHarness) -> None:
    harness.start()
    cp = control(harness)
    bad = cp.invoke("always_fail", {"x": 1}).id
    first = wait_state(harness, cp, bad, "FAILED")
    assert first["attempts"] == 3 and first["error"]["errorMessage"] == "boom on attempt 3"
    assert cp.retry(bad) == {"id": bad, "outcome": "queued", "previous_state": "FAILED", "state": "QUEUED"}
    again = wait_state(harness, cp, bad, "FAILED")
    assert again["attempts"] == 3 and harness.runs(bad) == 6
    good = cp.invoke("echo", {}).id
    wait_state(harness, cp, good, "SUCCEEDED")
    with pytest.raises(ConflictError, match="SUCCEEDED; only"):
        cp.retry(good)
    with pytest.raises(NotFoundError):
        cp.retry("no-such-task")
    assert len([r for r in harness.records("failure", 2) if r["key"] == bad]) == 2  # one record per run


def test_lost_worker_is_found_by_its_lease_and_the_task_requeued(harness: FleetHarness) -> None:
    """SIGKILL of a whole GPU worker (Celery parent and pool child): Celery cannot re-queue the message (it sits
    unacknowledged for visibility_timeout, 25 h); the lease (3 s here) lapses and the reaper re-queues it."""
    harness.start()
    cp = control(harness)
    task_id = cp.invoke("slow", {"seconds": 4}).id
    wait_state(harness, cp, task_id, "RUNNING")
    child = psutil.Process(int(harness.wait_for(lambda: harness.redis.get(f"pid:{task_id}"), 10, "pid")))
    parent = child.parent()
    assert parent is not None and "gpufleet.worker.process" in " ".join(parent.cmdline())
    lost_at = time.monotonic()
    os.kill(parent.pid, signal.SIGKILL)
    os.kill(child.pid, signal.SIGKILL)
    done = wait_state(harness, cp, task_id, "SUCCEEDED", timeout_s=30)
    assert done["attempts"] == 2 and harness.runs(task_id) == 2
    assert done["last_error"]["errorType"] == "WorkerLost"
    assert time.monotonic() - lost_at < 20  # seconds, not the 25 h visibility timeout
    assert "lost_tasks_requeued" in harness.log_text()


def test_redelivery_window_shorter_than_the_task_does_not_run_it_twice(harness: FleetHarness) -> None:
    """Redis re-delivers an unacknowledged message after visibility_timeout (2 s here, checked every second);
    the copy reaches the idle worker, which sees the task RUNNING with a live lease and drops it."""
    harness.write_config(defaults={"visibility_timeout_s": 2}, worker={"virtual_gpus": 2})
    harness.start()
    cp = control(harness)
    task_id = cp.invoke("slow", {"seconds": 8}).id
    done = wait_state(harness, cp, task_id, "SUCCEEDED", timeout_s=60)
    assert done["attempts"] == 1 and harness.runs(task_id) == 1
    assert "task is running elsewhere; dropping this delivery" in harness.log_text()  # the copy did arrive


def test_a_queue_no_worker_serves_is_visible_and_its_tasks_expire(harness: FleetHarness) -> None:
    """needs_h100 asks for a model the (virtual) workers lack: status, position and queue say so, and
    max_event_age_s expires the task though no worker ever picks it up."""
    harness.start()
    cp = control(harness)
    harness.wait_for(lambda: cp.gpus(), what="the workers' inventory")
    echo = cp.queue("echo")
    assert echo["served"] is True and "warning" not in echo
    task_id = cp.invoke("needs_h100", {"x": 1}).id
    view = cp.status(task_id)
    assert view["state"] == "QUEUED" and view["served"] is False
    assert view["warning"] == f"no live worker consumes {harness.queue('needs_h100', 'h100')}"
    assert cp.position(task_id)["warning"] == view["warning"] and cp.queue("needs_h100")["served"] is False
    cli = subprocess.run([sys.executable, "-m", "gpufleet", "status", task_id, "--config", str(harness.config)],
                         env=harness.env(), capture_output=True, text=True, check=True)  # fmt: skip
    assert "warning    no live worker consumes" in cli.stdout

    expired = wait_state(harness, cp, task_id, "EXPIRED", timeout_s=30)
    assert expired["condition"] == "EventAgeExceeded" and "no worker took it" in expired["error"]["errorMessage"]
    assert harness.runs(task_id) == 0
    [record] = [r for r in harness.records("failure", 1) if r["key"] == task_id]
    assert record["value"]["requestContext"]["condition"] == "EventAgeExceeded"
    assert record["value"]["requestPayload"] == {"x": 1}
    assert cp.position(task_id)["position"] is None
