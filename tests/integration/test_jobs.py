"""Sharded jobs (issue 14) against real worker processes: ``tiles`` splits into shards of ``tile`` and merges their
values (tests/functions/testfns.py); one host with two virtual GPUs runs them."""

from __future__ import annotations

import contextlib
import os
import signal
import time
from datetime import datetime
from typing import Any

import orjson
import psutil
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.services import S3Service
from gpufleet.errors import ConflictError
from gpufleet.intake.path import Intake, Producer
from gpufleet.registry.jobs import MAX_SPLIT_BYTES, JobStore, shard_id
from gpufleet.worker.jobs import JOB_ORIGIN
from tests.harness import FleetHarness
from tests.integration.test_cli_control import cli
from tests.integration.test_object_pull import make_bucket, s3_settings
from tests.s3util import s3_client


def up(harness: FleetHarness, gpus: int = 2) -> ControlPlane:
    harness.start_host("h1", ["default"], virtual_gpus=gpus)
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: sum(1 for g in plane.gpus() if g.get("up") and not g["stale"]) == gpus, what="the GPUs")
    return plane


def epoch(iso: str) -> float:
    return datetime.fromisoformat(iso).timestamp()


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
    # The job's own times: from its split, before every shard, to its merge, after every one (not the merge step's).
    assert epoch(view["started_at"]) <= min(a for a, _ in spans) + 0.001  # iso: milliseconds
    assert epoch(view["finished_at"]) >= max(b for _, b in spans) - 0.001
    [listed] = [f for f in plane.functions() if f["name"] == "tiles"]
    assert listed["job"] == {"shard": "tile", "max_shards": 40, "shard_records": False}


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
    shown = cli(harness, "status", job).stdout  # gpufleet status: the progress, then a line per shard
    assert "shards     5/5 done: 1 FAILED, 4 SUCCEEDED" in shown, shown
    [row] = [line for line in shown.splitlines() if line.startswith("3 ")]
    assert row.split()[:3] == ["3", "FAILED", "3"] and "ValueError: tile 3 cannot be processed" in row, row
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
    # Shard 0 ignores cancel: it is killed after cancel_grace_s (2 s here); shard 1 stops when asked.
    job = plane.invoke("tiles", {"n": 8, "seconds": 30, "shard": {"0": {"deaf": True}}}).id
    running = lambda: plane.status(job).get("shards", {}).get("counts", {}).get("RUNNING")  # noqa: E731
    harness.wait_for(lambda: running() == 2, what="two shards running")
    assert plane.cancel(job)["outcome"] == "cancelling"
    view = finished(plane, job, timeout_s=30)
    assert view["state"] == "CANCELLED", view
    assert view["shards"]["counts"] == {"CANCELLED": 8}
    assert "the handler ignored the cancel" in view["shards"]["items"][0]["error"]["errorMessage"]
    [(key, record)] = records(harness)  # the job's, listing its shards however it ended
    assert key == job and [s["state"] for s in record["responseContext"]["shards"]] == ["CANCELLED"] * 8
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
    assert harness.redis.get(harness.registry.keys.task(shard_id(first.id, 3))) is None


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
    assert harness.redis.exists(harness.registry.keys.task(shard_id(job, 0))) == 0  # no shard was created


def test_a_split_of_megabytes_is_written_in_parts_and_every_shard_runs_once(harness: FleetHarness) -> None:
    """Each part is a script of its own, about SPLIT_PART_BYTES (1 MiB): Redis serves others between them."""
    plane = up(harness)
    job = plane.invoke("bigsplit", {"n": 40, "size": 60_000}).id  # 40 events of 60 KB: about 6 parts
    view = finished(plane, job)
    assert view["state"] == "SUCCEEDED" and view["result"] == 40, view
    assert view["shards"]["total"] == 40 and view["shards"]["counts"] == {"SUCCEEDED": 40}
    written = int((harness.registry.get(job) or {}).get("split_written", 0))
    assert 0 < written < 40  # the parts before the last (the last parks the job with it)
    assert [harness.runs(shard_id(job, i)) for i in range(40)] == [1] * 40


def test_a_cancel_between_the_parts_of_a_split_cancels_the_shards_written_so_far(
    harness: FleetHarness, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A cancel that lands while a big split is written: the next part sees it and writes nothing, and the shards
    the parts before wrote (they may have started) are cancelled with the job."""
    plane = ControlPlane(harness.fleet())  # no worker: this test is the job's worker
    job = plane.invoke("bigsplit", {"n": 3, "size": 10}).id
    registry = harness.registry
    assert registry.claim(job, "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    fleet = harness.fleet()
    intake = Intake(fleet, Producer("job", JOB_ORIGIN, 4 * 2**20))
    shards = [intake.task(fleet.functions["tile"], {"i": i, "blob": "x" * 600_000}, shard_id(job, i), "test")
              for i in range(3)]  # about 1.4 MB each: one part each  # fmt: skip
    store = JobStore(registry)
    real = store._split_part

    def part_then_cancel(**kw: Any) -> Any:
        outcome = real(**kw)
        assert plane.cancel(job)["outcome"] == "cancelling"  # the job runs (its split): signalled
        return outcome

    monkeypatch.setattr(store, "_split_part", part_then_cancel)
    assert store.split(job, "w/1/1/a", shards, b"merge") == "cancelled"
    assert plane.status(shard_id(job, 0))["state"] == "CANCELLED"
    assert [registry.get(shard_id(job, i)) for i in (1, 2)] == [None, None]


def test_a_split_of_more_than_16_mib_fails_at_once_and_writes_nothing(harness: FleetHarness) -> None:
    """Before: 1,500 shard events of 65 KB added 189 MiB to Redis in one script, which blocked it for 746 ms."""
    plane = up(harness, gpus=1)
    job = plane.invoke("bigsplit", {"n": 300, "size": 60_000}).id  # 18 MB together, each under 64 KiB
    view = finished(plane, job)
    assert view["state"] == "FAILED" and view["attempts"] == 1, view
    assert view["error"]["errorType"] == "SplitTooLarge", view["error"]
    assert f"more than {MAX_SPLIT_BYTES} bytes together" in view["error"]["errorMessage"]
    assert harness.redis.exists(harness.registry.keys.task(shard_id(job, 0))) == 0


def test_a_shard_that_returns_its_data_inline_fails_at_once_and_says_to_upload_it(harness: FleetHarness) -> None:
    plane = up(harness, gpus=1)
    job = plane.invoke("tiles", {"n": 2, "shard": {"1": {"huge": True}}}).id
    view = finished(plane, job)
    assert view["state"] == "FAILED" and view["error"]["shards"] == [1], view
    shard = view["shards"]["items"][1]
    assert shard["attempts"] == 1 and shard["error"]["errorType"] == "ShardResultTooLarge", shard
    assert "more than 65536: upload it (ctx.upload) and return its URI" in shard["error"]["errorMessage"]
    plain = plane.invoke("tile", {"i": 0, "huge": True}).id  # the same function outside a job: no such limit
    assert finished(plane, plain)["state"] == "SUCCEEDED"


def records(harness: FleetHarness) -> list[tuple[str, dict[str, Any]]]:
    """The callback records written so far (no dispatcher runs here: they wait in the stream), as (key, record)."""
    return [(f[b"key"].decode(), orjson.loads(f[b"value"]))
            for _, f in harness.redis.xrange(harness.registry.keys.callbacks)]  # fmt: skip


def test_one_record_for_the_job_lists_its_shards_and_shard_records_are_optional(harness: FleetHarness) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 3}).id
    assert finished(plane, job)["state"] == "SUCCEEDED"
    [(key, record)] = records(harness)  # the shards send none
    assert key == job and record["requestContext"]["condition"] == "Success"
    assert record["responsePayload"] == {"n": 3, "values": [0, 10, 20]}
    views = [plane.status(shard_id(job, i)) for i in range(3)]
    started = epoch(record["responseContext"]["startedAt"])
    assert started <= min(epoch(v["started_at"]) for v in views)  # the job's start, not its merge's
    last = max(epoch(v["finished_at"]) for v in views)
    assert record["responseContext"]["durationMs"] >= (last - started) * 1000 - 1  # iso: milliseconds
    listed = record["responseContext"]["shards"]
    assert [(s["index"], s["id"], s["state"], s["attempts"]) for s in listed] == [
        (i, shard_id(job, i), "SUCCEEDED", 1) for i in range(3)]  # fmt: skip

    # A job's view lists its shards a page at a time (before: all of them, 2 MB for a big job); a listing, none.
    page = plane.status(job, shards_offset=1, shards_limit=1)["shards"]
    assert [s["index"] for s in page["items"]] == [1] and page["next_offset"] == 2 and page["total"] == 3
    assert plane.status(job, shards_offset=2)["shards"]["next_offset"] is None
    [row] = [t for t in plane.tasks("tiles")["items"] if t["id"] == job]
    assert not (row.get("shards") or {}).get("items")
    assert row["result"] is None and row["result_bytes"] == len(orjson.dumps({"n": 3, "values": [0, 10, 20]}))

    logged = plane.invoke("tiles_logged", {"n": 2}).id  # shard_records=True: each shard's record too
    assert finished(plane, logged)["result"] == 10
    keys = [key for key, _ in records(harness)[1:]]
    assert sorted(keys) == sorted([shard_id(logged, 0), shard_id(logged, 1), logged]) and keys[-1] == logged


@pytest.mark.parametrize("step", ["split", "merge"])
def test_a_worker_killed_mid_split_or_mid_merge_runs_that_step_again_and_no_shard_twice(
    harness: FleetHarness, step: str
) -> None:
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 3, f"{step}_s": 4}).id
    harness.wait_for(lambda: harness.redis.get(f"{step}s:{job}"), what=f"the {step} to start")
    harness.wait_for(lambda: any(g.get("task_id") == job for g in plane.gpus()), what=f"the {step} on a GPU")
    [gpu] = [g for g in plane.gpus() if g.get("task_id") == job]
    os.kill(gpu["pid"], signal.SIGKILL)
    view = finished(plane, job, timeout_s=90)
    assert view["state"] == "SUCCEEDED" and view["result"]["values"] == [0, 10, 20], view
    assert int(harness.redis.get(f"{step}s:{job}") or 0) == 2
    assert [harness.runs(shard_id(job, i)) for i in range(3)] == [1, 1, 1]


def test_shards_inherit_their_job_s_priority_so_a_small_urgent_job_passes_a_big_one(harness: FleetHarness) -> None:
    plane = up(harness, gpus=1)
    big = plane.invoke("tiles", {"n": 8, "seconds": 0.4}, priority=2).id
    harness.wait_for(lambda: plane.status(big).get("phase") == "shards", what="the big job split")
    small = plane.invoke("tiles", {"n": 2, "seconds": 0.1}, priority=8).id
    small_view, big_view = finished(plane, small), finished(plane, big)
    assert small_view["state"] == big_view["state"] == "SUCCEEDED"
    assert plane.status(shard_id(small, 0))["priority"] == 8 and plane.status(shard_id(big, 0))["priority"] == 2
    # The small job's shards ran before most of the big job's: the big one had queued all eight before it came.
    small_done = max(s["finished_at"] for s in small_view["shards"]["items"])
    after = [s for s in big_view["shards"]["items"] if s["started_at"] > small_done]
    assert len(after) >= 5, big_view["shards"]["items"]


def test_a_job_from_a_bucket_event_splits_the_object_and_its_shards_are_plain_tasks(
    harness: FleetHarness, seaweedfs: S3Service
) -> None:
    s3 = s3_client(seaweedfs.url, seaweedfs.access_key, seaweedfs.secret_key)
    bucket = make_bucket(s3, harness)
    s3.put_object(Bucket=bucket, Key="in/lines.txt", Body=b"one\ntwo\nthree\n")
    harness.write_config(triggers={"poll": {"source": f"s3://{bucket}/in/", "function": "objtiles",
                                            "output": f"s3://{bucket}/out", "poll_interval_s": 1}},
                         s3=s3_settings(seaweedfs))  # fmt: skip
    harness.start()
    [record] = harness.records("success", 1)  # the job's only: its shards send none
    job = record["value"]["requestContext"]["requestId"]
    payload = record["value"]["responsePayload"]
    assert payload["key"] == "in/lines.txt" and payload["values"] == [0, 10, 20]
    assert payload["summary"] == f"s3://{bucket}/out/{job}/summary.txt"  # the trigger's output, for the merge too
    assert s3.get_object(Bucket=bucket, Key=f"out/{job}/summary.txt")["Body"].read() == b"0 10 20"
    assert [harness.runs(shard_id(job, i)) for i in range(3)] == [1, 1, 1]


def thaw(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # killed while frozen (its host replaced it)
        os.kill(pid, signal.SIGCONT)


@pytest.mark.chaos  # leases of 3 s: on a machine loaded by other tests, a starved process loses one it holds
def test_a_job_survives_its_workers_being_killed_and_frozen_at_every_step(harness: FleetHarness) -> None:
    """GPU worker processes killed (SIGKILL) or frozen (SIGSTOP, then thawed after their lease lapsed) whatever they
    run: split, shards or merge. The job still succeeds with every shard's result, each shard's success is recorded
    once, and every run beyond the first is explained by a kill or a freeze."""
    plane = up(harness)
    job = plane.invoke("tiles", {"n": 16, "seconds": 0.6, "split_s": 0.5, "merge_s": 0.5}).id
    faults, frozen, hit = 0, [], set()
    deadline = time.monotonic() + 120
    while plane.status(job)["state"] not in ("SUCCEEDED", "FAILED") and time.monotonic() < deadline:
        time.sleep(1.2)
        # A kill or a freeze spends an attempt of the task it hits (a task that kills its process must end), so each
        # task is hit once at most: a shard hit three times (or the job's step twice) would rightly fail the job.
        busy = [g for g in plane.gpus() if g.get("task_id") and g.get("pid") and not g["stale"]]
        busy = [g for g in busy if g["task_id"] not in hit]
        if not busy or faults >= 8:
            continue
        victim = busy[faults % len(busy)]
        hit.add(victim["task_id"])
        try:  # the inventory is up to 2 s old: its process may be gone already
            if faults % 3 == 2:  # frozen, with its pool process: the lease lapses (3 s here), it runs elsewhere
                tree = [victim["pid"], *(c.pid for c in psutil.Process(victim["pid"]).children(recursive=True))]
                for pid in tree:
                    os.kill(pid, signal.SIGSTOP)
                frozen += [(pid, time.monotonic() + 5) for pid in tree]
            else:
                os.kill(victim["pid"], signal.SIGKILL)
        except (psutil.NoSuchProcess, ProcessLookupError):
            continue
        faults += 1
        for pid, until in [f for f in frozen if f[1] < time.monotonic()]:
            thaw(pid)
            frozen.remove((pid, until))
    for pid, _ in frozen:
        thaw(pid)
    view = finished(plane, job, timeout_s=90)
    assert view["state"] == "SUCCEEDED", (view.get("error"), view["shards"]["counts"], view["shards"]["items"])
    assert view["result"] == {"n": 16, "values": [i * 10 for i in range(16)]}
    runs = sum(harness.runs(shard_id(job, i)) for i in range(16))
    steps = int(harness.redis.get(f"splits:{job}") or 0) + int(harness.redis.get(f"merges:{job}") or 0)
    assert faults >= 4 and 16 + 2 <= runs + steps <= 16 + 2 + faults, (faults, runs, steps)
    assert [key for key, _ in records(harness)] == [job]  # one record: the job's, once
