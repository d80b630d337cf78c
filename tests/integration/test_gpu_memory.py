"""GPU memory as a resource, on GPUs the fake NVML shows to real worker processes: a task runs only on a GPU with
room for it, waits saying why while none has, and is refused at intake when no GPU of the fleet could ever hold it."""

from __future__ import annotations

import os
import time
from typing import Any

import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.dev import fakenvml
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.errors import EventError, InvalidRequestError
from gpufleet.intake.path import Intake, Producer
from gpufleet.registry import inventory
from gpufleet.scheduling.placement import Placer
from gpufleet.worker.supervisor import Supervisor
from tests.harness import FleetHarness

GB = 1024


def _view(plane: ControlPlane, task_id: str) -> dict[str, Any]:
    return plane.view(plane.record(task_id))


def test_a_task_waits_for_a_gpu_with_room_says_why_and_runs_there_once_it_has(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    fake_gpus.add("NVIDIA L4", memory_gb=24)  # too small for `sized` (40 GiB): never reads its queue
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.hold(1, 60 * GB, pid=os.getpid())  # another process (this test) holds 60 of the H100's 80 GiB
    harness.start_host("gpuhost", ["default"], virtual_gpus=0, env=fake_gpus.env)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(
        lambda: len([g for g in inventory.gpus(plane.registry) if g["up"] and g["memory_others_mb"] == 60 * GB]) == 1,
        what="both GPUs in the inventory, the H100 with 60 GiB held by another process",
    )
    big = plane.invoke("sized", {"n": 1}).id
    small = plane.invoke("echo", {"n": 2}).id
    waiting = harness.wait_for(lambda: _view(plane, big)["waiting_for"], what="the task to say why it waits")
    assert "sized needs 40960 MiB" in waiting and "gpu1@gpuhost has 20480 MiB of 81920" in waiting, waiting
    harness.wait_for(lambda: plane.record(small)["state"] == "SUCCEEDED", what="a task that fits runs meanwhile")
    assert _view(plane, big)["state"] == "QUEUED" and harness.runs(big) == 0

    fake_gpus.release(1, os.getpid())
    harness.wait_for(lambda: plane.record(big)["state"] == "SUCCEEDED", what="the task, once the GPU has room")
    done = _view(plane, big)
    assert done["result"] == {"worker": "gpu1@gpuhost", "total_mb": 80 * GB, "room_mb": 80 * GB}
    assert done["attempts"] == 1 and harness.runs(big) == 1  # handed back while it waited: never counted
    assert done["waiting_for"] is None


def test_a_task_only_a_busy_gpu_could_hold_says_so_while_it_waits(harness: FleetHarness, fake_gpus: FakeGpus) -> None:
    fake_gpus.add("NVIDIA L4", memory_gb=24)  # idle, but too small
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    harness.start_host("gpuhost", ["default"], virtual_gpus=0, env=fake_gpus.env)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in plane.gpus() if g["up"]]) == 2, what="both GPU workers up")
    blocker = plane.invoke("sized", {"n": 0, "seconds": 3}).id  # the H100 is busy with it for 3 s
    harness.wait_for(lambda: harness.runs(blocker) == 1, what="the H100 busy")
    waiting = plane.invoke("sized", {"n": 1}).id
    why = harness.wait_for(lambda: plane.status(waiting)["waiting_for"], what="the task to say why it waits")
    assert why == "waits for a GPU with 40960 MiB of room: those that have it are busy (gpu1@gpuhost)", why
    harness.wait_for(lambda: plane.status(waiting)["state"] == "SUCCEEDED", what="the task, once the H100 is free")


def test_a_task_no_gpu_of_the_fleet_can_hold_is_refused_at_intake(harness: FleetHarness, fake_gpus: FakeGpus) -> None:
    fleet = harness.fleet()
    plane = ControlPlane(fleet)
    assert plane.invoke("huge", {}).created  # no GPU reported yet: it may wait for one
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    supervisor = Supervisor(fleet, nvml=fakenvml)
    inventory.publish_gpus(supervisor.registry, supervisor.inventory())
    with pytest.raises(InvalidRequestError) as refused:
        ControlPlane(fleet).invoke("huge", {})
    assert refused.value.code == "gpu_memory"
    assert "huge needs 102400 MiB" in refused.value.message and "has 81920 MiB" in refused.value.message
    assert ControlPlane(fleet).invoke("sized", {}).created  # 40 GiB fits an H100

    # A trigger dead-letters it with the same reason.
    intake = Intake(fleet, Producer("requests", "trigger:requests", 4096), Placer(plane.registry, []))
    with pytest.raises(EventError) as dead:
        intake.task(fleet.functions["huge"], {}, "t1", "test")
    assert dead.value.reason == "gpu_memory"

    # A virtual GPU in the pool: its memory is unknown, so it may hold it.
    virtual = {"worker": "vgpu0@other", "pools": ["default"], "virtual": True, "seen_at": time.time()}
    inventory.publish_gpus(plane.registry, {"vgpu0@other": virtual})
    assert ControlPlane(fleet).invoke("huge", {"again": 1}).created
