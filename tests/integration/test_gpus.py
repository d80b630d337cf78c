"""GPU discovery against a faked NVML (there is no GPU here), and the per-GPU slot plan built from it."""

from __future__ import annotations

from gpufleet.registry import inventory
from gpufleet.worker.supervisor import Supervisor
from tests.harness import FleetHarness
from tests.unit.test_gpus import FakeNvml


def test_inventory_reports_live_memory_utilisation_and_the_running_task(harness: FleetHarness) -> None:
    fake = FakeNvml(["NVIDIA H100 80GB HBM3", "broken"])
    supervisor = Supervisor(harness.fleet(), nvml=fake)
    host = harness.fleet().settings.worker.hostname
    harness.redis.hset(f"{harness.prefix}:busy", f"gpu0@{host}", "task-7")  # what a claim writes
    inventory.publish_gpus(supervisor.registry, supervisor.inventory())
    gpu0, gpu1 = inventory.gpus(harness.registry)
    assert (gpu0["worker"], gpu0["model"], gpu0["memory_total_mb"]) == (f"gpu0@{host}", "H100", 81920)
    assert (gpu0["memory_used_mb"], gpu0["utilization_pct"], gpu0["task_id"]) == (1024, 40, "task-7")
    assert gpu0["up"] is False and gpu0["stale"] is False  # no process started in this test
    assert gpu1["utilization_pct"] is None and gpu1["task_id"] is None  # a failing GPU still shows up
    harness.redis.hset(f"{harness.prefix}:gpus", "gone@old", b'{"worker": "gone@old", "seen_at": 1}')
    assert [g["worker"] for g in inventory.gpus(harness.registry)] == [f"gpu0@{host}", f"gpu1@{host}"]  # forgotten
    supervisor.sampler.close()
    assert fake.shutdown_called
