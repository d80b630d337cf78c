"""A GPU in MIG mode, through the fake NVML, with real worker processes and real Redis: each of its 7 instances is a
worker of its own, pinned by its MIG UUID, that runs the functions of its profile and those whose memory fits it,
and no function that asks for a whole GPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.fakenvml import FakeGpus
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

FUNCTIONS = Path(__file__).parents[1] / "functions_gpus"


def test_seven_mig_instances_are_seven_workers_each_pinned_to_its_own(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    fake_gpus.add("NVIDIA H100 80GB HBM3")
    uuids = fake_gpus.mig(0, ["1g.10gb"] * 7)
    harness.write_config(functions=[str(FUNCTIONS)])
    host = f"mig-{harness.prefix}"
    harness.start_host(host, ["default"], virtual_gpus=0, env=fake_gpus.env)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 7, 60, "7 MIG workers up")
    assert {(g["worker"], g["mig"], g["memory_total_mb"]) for g in cp.gpus()} == {
        (f"gpu0.mig{i}@{host}", "1g.10gb", 10240) for i in range(7)
    }

    # Up in the inventory is not yet taking tasks: each pool process says when it is (P:ready), and a task of 2 s
    # leaves a slow one time to take its own rather than leave it to a neighbour done with its first.
    ready = cp.registry.keys.ready
    harness.wait_for(lambda: len(cp.registry.client.hkeys(ready)) == 7, 60, "7 MIG workers taking tasks")
    tiny = [cp.invoke("tiny", {"seconds": 2}).id for _ in range(7)]
    small = cp.invoke("small", {"seconds": 0.1}).id
    whole = cp.invoke("single", {"seconds": 0.1}).id  # asks for a whole GPU: no instance takes it
    done = finished(harness, cp, [*tiny, small])
    assert {d["state"] for d in done} == {"SUCCEEDED"}
    by_worker = {d["result"]["worker"]: d["result"] for d in done[:7]}
    assert len(by_worker) == 7  # one task per instance at a time: 7 ran side by side
    for i in range(7):
        result = by_worker[f"gpu0.mig{i}@{host}"]
        assert result["cuda"] == uuids[i] and result["memory_mb"] == 10240 and result["gpus"] == [f"gpu0.mig{i}"]
    assert done[7]["result"]["worker"].startswith("gpu0.mig") and done[7]["gpu"].endswith(":H100:1g.10gb")
    time.sleep(1)
    assert cp.status(whole)["state"] == "QUEUED" and harness.runs(whole) == 0

    cli = [sys.executable, "-m", "gpufleet", "gpus", "--config", str(harness.config)]
    out = subprocess.run(cli, env=harness.env(), capture_output=True, text=True, check=True).stdout
    assert "H100:1g.10gb" in out and f"gpu0.mig6@{host}" in out, out
