"""Sharded jobs (issue 14) against real worker processes: ``tiles`` splits into shards of ``tile`` and merges their
values (tests/functions/testfns.py); one host with two virtual GPUs runs them."""

from __future__ import annotations

import os
import signal
import time
from typing import Any

import pytest

from gpufleet.control import ControlPlane
from gpufleet.errors import ConflictError
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


def test_a_shard_that_fails_twice_is_retried_alone_and_the_job_succeeds(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 4, "shard": {"2": {"fail": 2}}}).id
    view = finished(plane, job)
    assert view["state"] == "SUCCEEDED", view
    assert [harness.runs(shard_id(job, i)) for i in range(4)] == [1, 1, 3, 1]
    assert view["shards"]["items"][2]["attempts"] == 3


def test_a_shard_that_always_fails_fails_the_job_and_a_retry_runs_only_that_shard(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 5, "shard": {"3": {"broken": "t3"}}}).id
    view = finished(plane, job)
    assert view["state"] == "FAILED" and view["error"]["errorType"] == "ShardsFailed", view
    assert view["error"]["shards"] == [3]
    assert f"shard 3 ({shard_id(job, 3)}) FAILED after 3 attempt(s): ValueError: tile 3 cannot be processed" in (
        view["error"]["errorMessage"])  # fmt: skip
    assert view["shards"]["counts"] == {"SUCCEEDED": 4, "FAILED": 1}
    with pytest.raises(ConflictError, match="retry the job") as refused:  # a shard alone: its job would not know
        plane.retry(shard_id(job, 3))
    assert refused.value.code == "retry_the_job"

    harness.redis.set("fixed:t3", 1)  # the function is fixed
    assert plane.retry(job)["state"] == "RUNNING"
    view = finished(plane, job)
    assert view["state"] == "SUCCEEDED" and view["result"]["values"] == [0, 10, 20, 30, 40], view
    assert [harness.runs(shard_id(job, i)) for i in range(5)] == [1, 1, 1, 4, 1]  # 3 failed attempts, then 1


def test_a_worker_killed_mid_shard_runs_that_shard_again_and_no_other(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 4, "shard": {"1": {"seconds": 6}}}).id
    slow = shard_id(job, 1)
    harness.wait_for(lambda: (harness.registry.get(slow) or {}).get("state") == "RUNNING", what="the slow shard")
    [gpu] = [g for g in plane.gpus() if g.get("task_id") == slow]
    os.kill(gpu["pid"], signal.SIGKILL)  # its GPU worker process, mid-shard
    view = finished(plane, job, timeout_s=90)
    assert view["state"] == "SUCCEEDED", view
    assert [harness.runs(shard_id(job, i)) for i in range(4)] == [1, 2, 1, 1]


def test_cancelling_a_job_leaves_no_shard_running_or_queued(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 8, "seconds": 30}).id
    running = lambda: plane.status(job).get("shards", {}).get("counts", {}).get("RUNNING")  # noqa: E731
    harness.wait_for(lambda: running() == 2, what="two shards running")
    assert plane.cancel(job)["outcome"] == "cancelling"
    view = finished(plane, job, timeout_s=30)
    assert view["state"] == "CANCELLED", view
    assert view["shards"]["counts"] == {"CANCELLED": 8}
    time.sleep(1)
    assert all(g.get("task_id") is None for g in plane.gpus()), plane.gpus()
    assert sum(harness.runs(shard_id(job, i)) for i in range(8)) == 2  # the two that had started, stopped


def test_the_same_job_event_twice_makes_one_job_and_one_set_of_shards(harness: FleetHarness) -> None:
    plane = up(harness)
    first = plane.invoke("tiles", {"n": 3}, idempotency_key="render-42")
    again = plane.invoke("tiles", {"n": 3}, idempotency_key="render-42")
    assert first.id == again.id and first.created and not again.created
    assert finished(plane, first.id)["state"] == "SUCCEEDED"
    assert plane.invoke("tiles", {"n": 3}, idempotency_key="render-42").id == first.id  # after it finished, too
    assert [harness.runs(shard_id(first.id, i)) for i in range(3)] == [1, 1, 1]
    assert harness.redis.get(harness.registry.task_key(shard_id(first.id, 3))) is None


@pytest.mark.parametrize(
    ("split", "error_type", "message"),
    [
        ([], "BadSplit", "split returned no shards"),
        ([{"i": i} for i in range(41)], "TooManyShards", "split returned 41 shards, more than max_shards=40"),
        ({"i": 0}, "BadSplit", "split returned a dict, not a list of shard events"),
        (70_000, "BadShard", "shard 0: its event is 70017 bytes, more than the 65536 a shard event may hold"),
    ],
)
def test_a_split_that_cannot_run_as_shards_fails_the_job_at_once_with_why(
    harness: FleetHarness, split: Any, error_type: str, message: str
) -> None:
    plane = up(harness, gpus=1)
    job = plane.invoke("tiles", {"n": 0, "blob": split} if isinstance(split, int) else {"n": 0, "split": split}).id
    view = finished(plane, job)
    assert view["state"] == "FAILED" and view["attempts"] == 1, view  # not retried: every attempt would split so
    assert view["error"]["errorType"] == error_type and message in view["error"]["errorMessage"], view["error"]
    assert harness.redis.exists(harness.registry.task_key(shard_id(job, 0))) == 0  # no shard was created
