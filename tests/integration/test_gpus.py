"""GPU discovery against a faked NVML (there is no GPU here), and the per-GPU slot plan built from it."""

from __future__ import annotations

import time

from gpufleet.dev import fakenvml
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.registry import inventory
from gpufleet.registry.model import State
from gpufleet.worker.supervisor import Supervisor
from tests.harness import FleetHarness
from tests.integration.test_registry import enqueue


def test_inventory_reports_live_memory_utilisation_and_the_running_task(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    fake_gpus.hold(0, 1024, pid=1)
    fake_gpus.set(0, utilization=40)
    supervisor = Supervisor(harness.fleet(), nvml=fakenvml)
    fake_gpus.set(1, lost=True)  # after discovery: it fell off the bus since
    host = harness.fleet().settings.worker.hostname
    enqueue(harness, "task-7")
    claim = harness.registry.claim("task-7", "QUEUED", "", "me/1/1/a", 30, f"gpu0@{host}", "0")
    assert claim.ok  # a claim is what says which task a worker runs
    inventory.publish_gpus(supervisor.registry, supervisor.inventory())
    gpu0, gpu1 = inventory.gpus(harness.registry)
    assert (gpu0["worker"], gpu0["model"], gpu0["memory_total_mb"]) == (f"gpu0@{host}", "H100", 81920)
    assert (gpu0["memory_used_mb"], gpu0["utilization_pct"], gpu0["task_id"]) == (1024, 40, "task-7")
    assert (gpu0["memory_free_mb"], gpu0["memory_others_mb"]) == (80896, 1024)
    assert gpu0["up"] is False and gpu0["stale"] is False  # no process started in this test
    assert gpu1["utilization_pct"] is None and gpu1["task_id"] is None  # a failing GPU still shows up
    harness.redis.hset(f"{harness.prefix}:gpus", "gone@old", b'{"worker": "gone@old", "seen_at": 1}')
    assert [g["worker"] for g in inventory.gpus(harness.registry)] == [f"gpu0@{host}", f"gpu1@{host}"]  # forgotten
    supervisor.sampler.close()


def test_which_task_a_worker_runs_is_read_from_the_leases_and_a_task_claimed_ahead_comes_second(
    harness: FleetHarness,
) -> None:
    """No claim writes a worker -> task entry: the leases and the records say it. A worker that claimed the next task
    ahead while one runs holds both, the running one first; a finished task leaves the view."""
    reg = harness.registry
    for task_id in ("first", "ahead", "other"):
        enqueue(harness, task_id)
    assert reg.claim("first", "QUEUED", "", "me/1/1/a", 30, "gpu0@h", "0").ok
    time.sleep(0.01)  # started_at orders them
    assert reg.claim("ahead", "QUEUED", "", "me/1/1/a", 30, "gpu0@h", "0").ok
    assert reg.claim("other", "QUEUED", "", "you/2/2/b", 30, "gpu1@h", "1").ok
    assert inventory.running(reg) == {"gpu0@h": ["first", "ahead"], "gpu1@h": ["other"]}
    assert inventory.busy(reg) == {"gpu0@h": "first", "gpu1@h": "other"}
    assert reg.finish("first", "me/1/1/a", State.SUCCEEDED, {}, [])
    assert inventory.busy(reg) == {"gpu0@h": "ahead", "gpu1@h": "other"}
