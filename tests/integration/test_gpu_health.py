"""GPU health with real worker processes on fake NVML GPUs: a GPU found broken is cordoned at once, its running task
goes back uncounted and runs elsewhere, and it takes nothing until it is uncordoned; an operator's cordon lets the
running task finish first; a GPU healthy again uncordons itself where the fleet allows it."""

from __future__ import annotations

import subprocess
import sys
import time
from typing import Any

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.worker.supervisor import INVENTORY_EVERY_S
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

HOST = "healthy-host"


def two_gpus(harness: FleetHarness, fake: FakeGpus, **worker: Any) -> ControlPlane:
    fake.add()
    fake.add()
    harness.start_host(HOST, ["default"], virtual_gpus=0, env=fake.env, **worker)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 2, what="both GPU workers up")
    return cp


def gpu(cp: ControlPlane, worker: str) -> dict[str, Any]:
    return next(g for g in cp.gpus() if g["worker"] == worker)


def running_on(harness: FleetHarness, cp: ControlPlane, task_id: str) -> str:
    harness.wait_for(lambda: harness.runs(task_id) >= 1, what="the task running")
    return str(cp.status(task_id)["worker"])


def test_a_broken_gpu_is_cordoned_and_its_task_runs_again_elsewhere_uncounted(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    cp = two_gpus(harness, fake_gpus)
    task = cp.invoke("slow", {"seconds": 4}).id
    broken = running_on(harness, cp, task)
    other = next(g["worker"] for g in cp.gpus() if g["worker"] != broken)
    fake_gpus.xid(int(broken[3]), 79)  # gpu<i>@host: the GPU of that worker falls off the bus
    cordon = harness.wait_for(lambda: gpu(cp, broken)["cordoned"], 10, "the broken GPU cordoned")
    assert cordon["by"] == "health" and cordon["reason"] == "XID 79: fallen off the bus"
    [done] = finished(harness, cp, [task])
    assert done["state"] == "SUCCEEDED" and done["worker"] == other and done["attempts"] == 1, done
    assert harness.runs(task) == 2 and done["last_error"]["errorType"] == "GpuCordoned"

    # It takes nothing while cordoned: its worker is stopped, and stays stopped.
    ids = [cp.invoke("echo", {"n": n}).id for n in range(6)]
    assert {v["worker"] for v in finished(harness, cp, ids)} == {other}
    assert gpu(cp, broken)["up"] is False
    cli = [sys.executable, "-m", "gpufleet", "gpus", "--config", str(harness.config)]
    out = subprocess.run(cli, env=harness.env(), capture_output=True, text=True, check=True).stdout
    assert "cordoned" in out and f"{broken}: cordoned by health: XID 79: fallen off the bus" in out, out

    # An operator puts it back in service: its worker starts again.
    assert cp.uncordon(broken) == {"worker": broken, "cordoned": False, "was_cordoned": True}
    harness.wait_for(lambda: gpu(cp, broken)["up"] and not gpu(cp, broken)["cordoned"], 30, "the GPU back")


def test_an_operators_cordon_lets_the_running_task_finish_then_takes_nothing(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    cp = two_gpus(harness, fake_gpus)
    task = cp.invoke("slow", {"seconds": 3}).id
    fenced = running_on(harness, cp, task)
    assert cp.cordon(fenced, "driver update") == {"worker": fenced, "cordoned": True}
    [done] = finished(harness, cp, [task])
    assert done["state"] == "SUCCEEDED" and done["worker"] == fenced and harness.runs(task) == 1  # it finished there
    harness.wait_for(lambda: not gpu(cp, fenced)["up"], 30, "its worker stopped")
    ids = [cp.invoke("echo", {"n": n}).id for n in range(4)]
    assert fenced not in {v["worker"] for v in finished(harness, cp, ids)}
    assert gpu(cp, fenced)["cordoned"]["reason"] == "driver update"

    # Its last GPU cordoned too, the host drains: it takes nothing, and says so, until one is back.
    other = next(g["worker"] for g in cp.gpus() if g["worker"] != fenced)
    cp.cordon(other, "node maintenance")
    harness.wait_for(lambda: not gpu(cp, other)["up"] and gpu(cp, other)["host_draining"], 30, "the host draining")
    waiting = cp.invoke("echo", {"n": 9}).id
    cli = [sys.executable, "-m", "gpufleet", "gpus", "--config", str(harness.config)]
    out = subprocess.run(cli, env=harness.env(), capture_output=True, text=True, check=True).stdout
    assert f"{HOST}: draining: every GPU cordoned" in out, out
    time.sleep(2 * INVENTORY_EVERY_S)
    assert cp.status(waiting)["state"] == "QUEUED" and harness.runs(waiting) == 0
    cp.uncordon(other)
    [done] = finished(harness, cp, [waiting])
    assert done["worker"] == other and not gpu(cp, other)["host_draining"]


def test_a_gpu_healthy_again_uncordons_itself_where_the_fleet_allows_it(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    cp = two_gpus(harness, fake_gpus, auto_uncordon_s=1)
    fake_gpus.set(0, ecc_uncorrected=3)
    worker = f"gpu0@{HOST}"
    harness.wait_for(lambda: gpu(cp, worker)["cordoned"], 10, "the GPU with ECC errors cordoned")
    harness.wait_for(lambda: not gpu(cp, worker)["up"], 10, "its worker stopped")
    fake_gpus.set(0, ecc_uncorrected=0)  # reset: the volatile count starts again
    harness.wait_for(lambda: gpu(cp, worker)["up"] and not gpu(cp, worker)["cordoned"], 30, "the GPU back by itself")
