"""Pools with overflow, against real worker processes standing for hosts of two pools (issue 13).

``spill`` prefers pool eu and allows 1.5 s of estimated queue wait there (tests/functions/testfns.py); one host
serves eu and one serves us, one virtual GPU each.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from gpufleet.cli.views import render_status
from gpufleet.control.plane import ControlPlane
from gpufleet.registry.snapshot import read
from tests.harness import FleetHarness


def two_pools(harness: FleetHarness, **eu: Any) -> ControlPlane:
    """A host in eu and a host in us, one virtual GPU each, both reporting; ``eu``: worker settings of eu's."""
    harness.start_host("eu-host", ["eu"], **eu)
    harness.start_host("us-host", ["us"])
    plane = ControlPlane(harness.fleet())
    live = lambda: {g["host"] for g in plane.gpus() if g.get("up") and not g["stale"]}  # noqa: E731
    harness.wait_for(lambda: live() == {"eu-host", "us-host"}, what="a host in each pool")
    return plane


def test_a_burst_fills_the_first_pool_up_to_its_wait_limit_then_overflows_and_each_task_runs_once(
    harness: FleetHarness,
) -> None:
    plane = two_pools(harness)

    # A function that never ran here counts 1 s per task: eu takes two (0 s, then 1 s of estimated wait), us two,
    # then the shorter estimate wins, the earlier pool on a tie.
    ids = [plane.invoke("spill", {"i": i, "seconds": 0.3}).id for i in range(8)]
    views: list[dict[str, Any]] = [plane.status(task_id) for task_id in ids]
    assert [v["pool"] for v in views] == ["eu", "eu", "us", "us", "eu", "us", "eu", "us"]
    assert [v["overflowed"] for v in views] == [v["pool"] == "us" for v in views]
    assert all(v["queue"] == f"{harness.prefix}.{v['pool']}.any.spill" for v in views)
    assert "pool       us (overflowed: not its first pool)" in render_status(views[2])  # gpufleet status
    assert "pool       eu\n" in render_status(views[0]) + "\n"

    done = harness.wait_for(lambda: all(plane.status(i)["state"] == "SUCCEEDED" for i in ids), what="the burst")
    assert done
    for task_id, view in zip(ids, views, strict=True):
        record = plane.status(task_id)
        assert record["worker"].endswith(f"@{view['pool']}-host"), record  # it ran in the pool it was placed in
        assert harness.runs(task_id) == 1
    snap = read(plane.registry, list(plane.fleet.functions))
    assert snap.overflows == {("spill", "eu", "us"): 4}


def test_a_pool_that_loses_its_workers_hands_its_waiting_tasks_to_the_next_and_each_runs_once_more_at_most(
    harness: FleetHarness,
) -> None:
    plane = two_pools(harness)
    # One runs on eu, one waits there (its estimate, 1 s, is within 1.5 s).
    running, waiting = (plane.invoke("spill", {"seconds": 4}).id for _ in range(2))
    assert plane.status(waiting)["pool"] == plane.status(running)["pool"] == "eu"
    # Its handler started (RUNNING is set by the claim, a moment before: a kill then would find no run to count).
    harness.wait_for(lambda: harness.runs(running) == 1, what="the first to start on eu")

    harness.stop_host("eu-host", signal.SIGKILL)  # the host and its GPU worker, at once
    lost_at = time.monotonic()
    harness.wait_for(lambda: plane.status(waiting)["pool"] == "us", timeout_s=30, what="the hand-over")
    handed_over_s = time.monotonic() - lost_at
    for task_id in (running, waiting):
        harness.wait_for(
            lambda t=task_id: plane.status(t)["state"] == "SUCCEEDED",
            timeout_s=60,
            what=f"us to run it: {plane.status(task_id)}",
        )
        view = plane.status(task_id)
        assert view["worker"].endswith("@us-host") and view["overflowed"], view
    assert harness.runs(waiting) == 1  # it never started on eu
    assert harness.runs(running) == 2  # killed with its host, then once on us
    assert handed_over_s < 15, f"handed over after {handed_over_s:.1f} s"
    assert read(plane.registry, list(plane.fleet.functions)).overflows == {("spill", "eu", "us"): 2}


def test_a_host_whose_gpu_worker_restarts_keeps_its_waiting_tasks(harness: FleetHarness) -> None:
    plane = two_pools(harness, restart_backoff_s=5)  # its GPU worker stays down for 5 s: the host is still there
    running, waiting = (plane.invoke("spill", {"seconds": 3}).id for _ in range(2))
    harness.wait_for(lambda: plane.status(running)["state"] == "RUNNING", what="the first to start on eu")
    [slot] = [g for g in plane.gpus() if g["host"] == "eu-host"]
    os.kill(slot["pid"], signal.SIGKILL)  # the GPU worker, not its host: the supervisor starts a new one
    for task_id in (running, waiting):
        harness.wait_for(lambda t=task_id: plane.status(t)["state"] == "SUCCEEDED", timeout_s=60, what="eu to run it")
        assert plane.status(task_id)["worker"].endswith("@eu-host")
    assert harness.runs(waiting) == 1
    assert read(plane.registry, list(plane.fleet.functions)).overflows == {}  # nothing moved, nothing overflowed


def test_a_version_is_placed_where_that_version_runs_and_handed_over_to_where_it_comes_up(
    harness: FleetHarness,
) -> None:
    # A rolling update half done across pools: eu runs version 1 of spill, us runs version 2.
    harness.start_host("eu-host", ["eu"], env={"SPILL_AS": "1"})
    harness.start_host("us-host", ["us"], env={"SPILL_AS": "2"})
    plane = ControlPlane(harness.fleet())
    states = lambda: {v["version"]: v["state"] for v in plane.versions("spill")}  # noqa: E731
    harness.wait_for(lambda: states().get("1") == states().get("2") == "ACTIVE", what="both versions up")

    # eu has no worker of version 2: its tasks go to us at once, wait or no wait; version 1's stay in eu.
    twos = [plane.invoke("spill:2", {"seconds": 0.1}).id for _ in range(3)]
    ones = [plane.invoke("spill:1", {"seconds": 0.1}).id for _ in range(3)]
    assert {plane.status(i)["pool"] for i in twos} == {"us"} and {plane.status(i)["pool"] for i in ones} == {"eu"}
    harness.wait_for(lambda: all(plane.status(i)["state"] == "SUCCEEDED" for i in twos + ones), what="all six")
    assert {plane.status(i)["worker"].split("@")[1] for i in twos} == {"us-host"}

    # Version 2's only host goes: a task for it waits in us (no pool runs it), then moves to eu once a host of
    # version 2 comes up there, and runs once.
    harness.stop_host("us-host", signal.SIGKILL)
    time.sleep(6.5)  # LIVE_S after its last report: the placer no longer counts us-host
    stranded = plane.invoke("spill:2", {"seconds": 0.1}).id
    time.sleep(3)  # two hand-over rounds with nowhere to go: it stays
    assert plane.status(stranded)["state"] == "QUEUED"
    harness.start_host("eu-host2", ["eu"], env={"SPILL_AS": "2"})
    harness.wait_for(lambda: plane.status(stranded)["state"] == "SUCCEEDED", timeout_s=60, what="the hand-over")
    view = plane.status(stranded)
    assert view["worker"].endswith("@eu-host2") and view["pool"] == "eu" and view["version"] == "2", view
    assert harness.runs(stranded) == 1
