"""Checkpoints and preemption with real worker processes and real Redis: a task whose process dies, or whose host's
GPUs are reclaimed, resumes where it last saved and ends as an undisturbed run does (a preemption spends no attempt,
a job's split's neither);
an attempt that lost its task cannot overwrite the new owner's state; a manual retry starts from nothing; a large
state goes to the object store, or fails the task with a clear error without one."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.services import S3Service
from gpufleet.errors import PermanentTaskError, TaskError
from gpufleet.registry.checkpoints import INLINE_MAX
from gpufleet.worker.bundle import ProcessBundle
from tests.harness import FleetHarness
from tests.integration.test_engine import finished, one_worker
from tests.integration.test_object_pull import s3_settings
from tests.s3util import s3_client


def starts(h: FleetHarness, task_id: str) -> list[int]:
    return [int(s) for s in h.redis.lrange(f"starts:{task_id}", 0, -1)]


def test_a_task_whose_worker_dies_resumes_from_its_last_checkpoint(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    calm = cp.invoke("steps", {"steps": 60}).id
    crashed = cp.invoke("steps", {"steps": 60, "crash_at": 30}).id
    a, b = finished(harness, cp, [calm, crashed])
    assert a["state"] == b["state"] == "SUCCEEDED" and a["result"] == b["result"], (a, b)
    assert starts(harness, calm) == [0] and a["attempts"] == 1 and a["checkpoints"] == 60
    assert starts(harness, crashed) == [0, 30] and b["attempts"] == 2 and b["checkpoints"] == 60  # 30 and 30 more
    assert b["checkpoint_at"] is not None and b["last_error"]["errorType"] == "WorkerLost", b["last_error"]


def test_only_the_owner_saves_and_a_retry_starts_from_nothing(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    task = cp.invoke("steps", {"steps": 2000, "pause_s": 0.01}).id
    harness.wait_for(lambda: cp.status(task)["checkpoints"] > 3, what="a few checkpoints")
    saved = ProcessBundle(harness.fleet(), "test@nowhere", "test:virtual").checkpoints
    with pytest.raises(TaskError, match="no longer owns"):
        saved.save(task, "a-zombie-attempt", {"step": 0, "total": -1})
    assert saved.load(task)["step"] > 3  # the owner's, untouched
    cp.cancel(task)
    finished(harness, cp, [task])
    assert saved.load(task) is not None  # kept with the record, for a look at where it stopped
    cp.retry(task)  # a new event: from the first step, not from the saved one
    harness.wait_for(lambda: len(starts(harness, task)) == 2, what="the retry running")
    assert starts(harness, task) == [0, 0]
    cp.cancel(task)


def test_a_large_state_goes_to_the_object_store_or_fails_clearly(harness: FleetHarness, moto: S3Service) -> None:
    harness.write_config()  # no worker.checkpoint_url: a state over what Redis keeps fails the task, and says why
    plain = ProcessBundle(harness.fleet(), "t@h", "t:virtual")
    with pytest.raises(PermanentTaskError, match=r"worker\.checkpoint_url") as err:
        plain.checkpoints.save("any-task", "any-owner", {"pad": "x" * INLINE_MAX})
    assert err.value.error_type == "BadCheckpoint"

    bucket = f"ckpt-{harness.prefix}"
    s3 = s3_client(moto.url)
    s3.create_bucket(Bucket=bucket)
    harness.write_config(s3=s3_settings(moto), worker={"virtual_gpus": 1, "checkpoint_url": f"s3://{bucket}/ck"})
    harness.start("worker")
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: [g for g in cp.gpus() if g["up"]], what="the worker ready")
    big = {"steps": 3, "crash_at": 2, "pad": INLINE_MAX}  # each state over what Redis keeps
    [done] = finished(harness, cp, [cp.invoke("steps", big).id])
    assert done["state"] == "SUCCEEDED" and done["result"] == {"steps": 3, "total": 14} and done["attempts"] == 2
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=bucket).get("Contents", [])]
    assert len(keys) == 3 and all(k.startswith(f"ck/{done['id']}/") for k in keys), keys


def test_a_preempted_task_runs_its_hook_and_resumes_without_spending_an_attempt(
    harness: FleetHarness, tmp_path: Path
) -> None:
    notice = tmp_path / "reclaimed"
    harness.write_config()
    cp = ControlPlane(harness.fleet())
    harness.start_host("spot", ["default"], preempt_notice=f"file://{notice}", env={"PREEMPT_NOTICE": str(notice)})
    calm = cp.invoke("steps", {"steps": 60}).id
    [undisturbed] = finished(harness, cp, [calm])
    task = cp.invoke("steps", {"steps": 60, "preempt_at": 30}).id
    harness.wait_for(lambda: harness.hosts["spot"].poll() is not None, 60, "the spot host gone on its notice")
    assert cp.status(task)["state"] == "QUEUED" and harness.redis.get(f"preempted:{task}") == b"1"  # hook ran
    harness.start_host("steady", ["default"])
    [done] = finished(harness, cp, [task])
    assert done["state"] == "SUCCEEDED" and done["result"] == undisturbed["result"], done
    assert starts(harness, task) == [0, 30]  # resumed where it was preempted
    assert done["attempts"] == 2 and done["preemptions"] == 1 and done["max_attempts"] == 3 + 1  # none spent
    assert done["last_error"]["errorType"] == "Preempted"


def test_a_job_preempted_in_its_split_goes_back_without_spending_an_attempt(
    harness: FleetHarness, tmp_path: Path
) -> None:
    notice = tmp_path / "reclaimed"
    harness.write_config()
    cp = ControlPlane(harness.fleet())
    harness.start_host("spot", ["default"], preempt_notice=f"file://{notice}")
    job = cp.invoke("tiles", {"n": 2, "split_s": 4}).id
    harness.wait_for(lambda: harness.redis.get(f"splits:{job}") == b"1", 60, "the split running")
    notice.write_text("reclaimed")
    harness.wait_for(lambda: harness.hosts["spot"].poll() is not None, 60, "the spot host gone on its notice")
    assert cp.status(job)["state"] == "QUEUED"
    harness.start_host("steady", ["default"])
    [done] = finished(harness, cp, [job], timeout_s=60)
    assert done["state"] == "SUCCEEDED" and done["result"] == {"n": 2, "values": [0, 10]}, done
    assert harness.redis.get(f"splits:{job}") == b"2"  # the split ran again, from the start
    # Recorded as a preemption, its attempt not spent (a job's attempts are its current step's: the merge's one).
    assert done["preemptions"] == 1 and done["max_attempts"] == 2 + 1, done
    assert done["last_error"]["errorType"] == "Preempted"
