"""A GPU that runs out of memory, or whose CUDA context breaks, with real worker processes and real Redis: the task
runs again under its function's ``oom_retries`` without spending its attempts, goes to a GPU with more room where the
fleet has one, fails ``GpuOutOfMemory`` with the peak it saw past them, and never crash-loops; a batch is halved and
the largest that fitted is remembered."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

from gpufleet.control.plane import ControlPlane
from gpufleet.dev.fakenvml import FakeGpus
from tests.harness import FleetHarness
from tests.integration.test_batch import calls, invoke
from tests.integration.test_engine import finished, one_worker


def host(h: FleetHarness, name: str, gpus: FakeGpus) -> ControlPlane:
    """One more worker host, whose GPUs are ``gpus``; returns a control plane once they are all up."""
    h.start_host(name, ["default"], virtual_gpus=0, env=gpus.env)
    cp = ControlPlane(h.fleet())
    up = lambda: len([g for g in cp.gpus() if g["up"] and g["host"] == name]) == len(gpus.gpus)  # noqa: E731
    h.wait_for(up, what=f"host {name}'s GPUs up")
    return cp


def _runs(h: FleetHarness, task_id: str) -> list[tuple[str, int]]:
    """Where each run of an ``oomy`` task ran: (worker, pid)."""
    return [(w, int(p)) for w, p in (r.decode().split() for r in h.redis.lrange(f"oomy:{task_id}", 0, -1))]


def test_an_oom_runs_again_without_spending_an_attempt_and_past_oom_retries_fails_with_its_peak(
    harness: FleetHarness, fake_gpus: FakeGpus
) -> None:
    fake_gpus.add("NVIDIA L4", memory_gb=24)
    fake_gpus.add("NVIDIA L4", memory_gb=24)  # idle while the first OOM runs again where it was
    cp = host(harness, "a", fake_gpus)
    once = cp.invoke("oomy", {"times": 1}).id
    twice = cp.invoke("oomy", {"times": 2}).id  # max_attempts=1, oom_retries=2: the third run succeeds
    always = cp.invoke("oomy", {"times": 99, "hold_mb": 20000}).id
    here, ok, failed = finished(harness, cp, [once, twice, always])
    # Its first OOM ran again where it was, never queued again:
    assert here["state"] == "SUCCEEDED" and here["gpu_retries"] == 1 and here["queued_at"] == here["created_at"]
    assert ok["state"] == "SUCCEEDED" and ok["attempts"] == 1 and ok["gpu_retries"] == 2, ok
    assert ok["result"]["runs"] == 3 and ok["last_error"]["errorType"] == "GpuOutOfMemory"
    assert failed["state"] == "FAILED" and harness.runs(always) == 3  # then no more: no crash loop
    error = failed["error"]
    assert error["errorType"] == "GpuOutOfMemory" and error["peakGpuMemoryMb"] == 20000, error
    assert "CUDA out of memory" in error["errorMessage"], error
    assert re.search(r"peak 20000 MiB of 24576 on gpu[01]@a", error["errorMessage"]), error
    assert "oom_retries (2)" in error["errorMessage"]
    for task in twice, always:
        first, second, *_ = _runs(harness, task)
        assert second == first  # the same GPU and process (an OOM leaves it as it is), not the idle one


def test_the_second_retry_of_an_oom_goes_to_a_gpu_with_more_room(harness: FleetHarness, tmp_path: Path) -> None:
    small, big = FakeGpus(tmp_path / "l4.json"), FakeGpus(tmp_path / "h100.json")
    small.add("NVIDIA L4", memory_gb=24)
    big.add("NVIDIA H100 80GB HBM3")
    cp = host(harness, "big", big)
    blocker = cp.invoke("coop", {"seconds": 120}).id  # keeps the H100 busy until cancelled
    harness.wait_for(lambda: harness.runs(blocker) == 1, what="the H100 busy")
    host(harness, "small", small)
    task = cp.invoke("oomy", {"below_mb": 40000}).id  # fits only the H100
    waiting = harness.wait_for(lambda: cp.status(task)["waiting_for"], what="the task waiting for more room")
    assert "it ran out of memory on a GPU with less room: it needs 24577 MiB" in waiting, waiting
    assert harness.runs(task) == 2  # the L4 takes it no more
    cp.cancel(blocker)
    [done] = finished(harness, cp, [task])
    assert done["state"] == "SUCCEEDED" and done["result"]["worker"] == "gpu0@big" and done["attempts"] == 1
    assert [w for w, _ in _runs(harness, task)] == ["gpu0@small", "gpu0@small", "gpu0@big"]


def test_then_to_a_pool_with_a_bigger_gpu_where_its_own_has_none(harness: FleetHarness, tmp_path: Path) -> None:
    small, big = FakeGpus(tmp_path / "l4.json"), FakeGpus(tmp_path / "h100.json")
    small.add("NVIDIA L4", memory_gb=24)
    big.add("NVIDIA H100 80GB HBM3")
    harness.start_host("eu-small", ["eu"], virtual_gpus=0, env=small.env)
    harness.start_host("us-big", ["us"], virtual_gpus=0, env=big.env)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 2, what="both hosts up")
    task = cp.invoke("oomy-pools", {"below_mb": 40000}).id  # placed in eu, its first pool, whose GPU is too small
    [done] = finished(harness, cp, [task])
    assert done["state"] == "SUCCEEDED" and done["result"]["worker"] == "gpu0@us-big", done
    assert done["pool"] == "us" and done["attempts"] == 1 and done["gpu_retries"] == 2
    assert [w for w, _ in _runs(harness, task)] == ["gpu0@eu-small", "gpu0@eu-small", "gpu0@us-big"]


def test_a_broken_cuda_context_replaces_the_process_and_the_task_runs_again_uncounted(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    once = cp.invoke("oomy", {"broken": 1}).id
    always = cp.invoke("oomy", {"broken": 99}).id
    ok, failed = finished(harness, cp, [once, always])
    assert ok["state"] == "SUCCEEDED" and ok["attempts"] == 1 and ok["gpu_retries"] == 1
    first, second = (pid for _, pid in _runs(harness, once))
    assert first != second  # a fresh process: every CUDA call in the old one would fail
    assert failed["state"] == "FAILED" and failed["error"]["errorType"] == "GpuContextBroken"
    assert harness.runs(always) == 3 and len({pid for _, pid in _runs(harness, always)}) == 3


def test_a_batch_that_runs_out_of_memory_is_halved_and_the_size_that_fitted_is_remembered(
    harness: FleetHarness,
) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1.5}).id  # the events queue up meanwhile: one batch of 8
    harness.wait_for(lambda: harness.runs(blocker) == 1, what="the blocker running")
    ids = [invoke(cp, tag, n, "oomy-batch", fits=2) for n in range(8)]
    views = finished(harness, cp, ids)
    assert all(v["state"] == "SUCCEEDED" and v["attempts"] == 1 for v in views), views
    assert [len(c) for c in calls(harness, tag)] == [8, 4, 2, 2, 4, 2, 2]  # halved down to what fits
    assert harness.redis.get(f"{harness.prefix}:fit:oomy-batch:virtual") == b"2"

    later = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1.5}).id
    harness.wait_for(lambda: harness.runs(blocker) == 1, what="the blocker running")
    ids = [invoke(cp, later, n, "oomy-batch", fits=2) for n in range(8)]
    assert all(v["state"] == "SUCCEEDED" for v in finished(harness, cp, ids))
    sizes = [len(c) for c in calls(harness, later)]
    assert max(sizes) == 2 and sum(sizes) == 8, sizes  # no larger than what fitted, and none ran out
