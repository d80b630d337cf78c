"""Sharded jobs (issue 14) against real worker processes: ``tiles`` splits into shards of ``tile`` and merges their
values (tests/functions/testfns.py); one host with two virtual GPUs runs them."""

from __future__ import annotations

import time
from typing import Any

from gpufleet.control import ControlPlane
from gpufleet.jobs import shard_id
from tests.harness import FleetHarness


def up(harness: FleetHarness, gpus: int = 2) -> ControlPlane:
    harness.start_host("h1", ["default"], virtual_gpus=gpus)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: sum(1 for g in plane.gpus() if g.get("up") and not g["stale"]) == gpus, what="the GPUs")
    return plane


def finished(plane: ControlPlane, job: str, timeout_s: float = 60) -> dict[str, Any]:
    final = ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "EXPIRED")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        view = plane.status(job)
        if view["state"] in final:
            return view
        time.sleep(0.2)
    raise AssertionError(f"job {job} did not finish: {plane.status(job)}")


def test_shards_run_in_parallel_on_both_gpus_and_merge_in_order(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 6, "seconds": 1.0}).id
    view = finished(plane, job)
    assert view["state"] == "SUCCEEDED", view
    assert view["result"] == {"n": 6, "values": [0, 10, 20, 30, 40, 50]}
    shards = view["shards"]
    assert shards["total"] == shards["done"] == 6 and shards["counts"] == {"SUCCEEDED": 6}
    assert [s["id"] for s in shards["items"]] == [shard_id(job, i) for i in range(6)]
    # Overlap, from their own timestamps: at some moment two shards ran at once, never more than the two GPUs.
    spans = [(s["started_at"], s["finished_at"]) for s in shards["items"]]
    at_once = max(sum(1 for a, b in spans if a <= t < b) for t, _ in spans)
    assert at_once == 2, spans
    assert len({s["worker"] for s in shards["items"]}) == 2
    assert all(harness.runs(shard_id(job, i)) == 1 for i in range(6))
    assert view["phase"] == "merge" and plane.status(shard_id(job, 3))["job"] == {"id": job, "index": 3}
