"""Dynamic batching with one outcome per event: real Redis, real worker processes, the ``batched`` test function
(max_size 8, max_wait_ms 50, max_attempts 2, max_event_age_s 30) and ``crowd`` (timeout_s 1.5, max_attempts 3)."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
import uuid
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from gpufleet.api.dashboard import overview
from gpufleet.cli.fleet import _tasks
from gpufleet.control.plane import ControlPlane
from gpufleet.functions import Batch
from gpufleet.registry.messages import MessageFactory, function_queue
from gpufleet.registry.model import Enqueued, NewTask
from gpufleet.worker import batch
from gpufleet.worker.runtime import Runtime
from tests.harness import FleetHarness
from tests.integration.test_engine import finished, one_worker, stamp


def calls(h: FleetHarness, tag: str) -> list[list[int]]:
    return [orjson.loads(c) for c in h.redis.lrange(f"batch:{tag}", 0, -1)]


def invoke(cp: ControlPlane, tag: str, n: int, function: str = "batched", **event: Any) -> str:
    return cp.invoke(function, {"tag": tag, "n": n, **event}).id


def queued_together(h: FleetHarness, cp: ControlPlane, function: str, modes: list[str]) -> tuple[str, list[str]]:
    """One event per mode, queued behind a running task, so that they form one batch."""
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1}).id
    h.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    return tag, [invoke(cp, tag, n, function, mode=mode) for n, mode in enumerate(modes)]


def test_a_batch_forms_from_what_is_queued_and_each_event_keeps_its_own_task(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1.5}).id  # the events queue up meanwhile
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    ids = [invoke(cp, tag, n) for n in range(20)]
    views = finished(harness, cp, ids)
    sizes = [len(c) for c in calls(harness, tag)]
    assert sorted(n for c in calls(harness, tag) for n in c) == list(range(20))  # each event in exactly one call
    assert max(sizes) == 8 and sizes.count(8) >= 2, sizes
    for n, view in enumerate(views):
        assert view["state"] == "SUCCEEDED" and view["attempts"] == 1 and harness.runs(view["id"]) == 1
        assert view["result"]["n"] == n and view["result"]["size"] in sizes
    # Each its own callback record, written with its outcome (the dispatcher, not started here, delivers them).
    records = [orjson.loads(f[b"value"]) for _, f in harness.redis.xrange(harness.registry.keys.callbacks)]
    mine = [r for r in records if r["requestPayload"].get("tag") == tag]
    assert sorted(r["requestPayload"]["n"] for r in mine) == list(range(20))
    assert {r["requestContext"]["requestId"] for r in mine} == set(ids)


@pytest.mark.serial
def test_a_lone_task_runs_at_once_alone(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    for n in range(3):
        [view] = finished(harness, cp, [invoke(cp, tag, n)])
        assert view["result"]["size"] == 1
        assert stamp(view["started_at"]) - stamp(view["queued_at"]) < 0.5
    assert calls(harness, tag) == [[0], [1], [2]]


def test_one_bad_event_fails_alone_and_a_poison_one_cannot_sink_its_neighbours(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1.5}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    modes = ["ok", "ok", "poison", "ok", "ok", "fail", "ok", "ok"]
    ids = [invoke(cp, tag, n, mode=mode) for n, mode in enumerate(modes)]
    views = finished(harness, cp, ids)
    for view, mode in zip(views, modes, strict=True):
        if mode == "ok":
            assert view["state"] == "SUCCEEDED" and view["attempts"] == 1, view
        else:
            assert view["state"] == "FAILED" and view["attempts"] == 2, view  # retried alone, then given up
    assert views[2]["error"]["errorType"] == "RuntimeError" and "poison" in views[2]["error"]["errorMessage"]
    assert views[5]["error"]["errorType"] == "ValueError" and "event 5 fails alone" in views[5]["error"]["errorMessage"]
    first = calls(harness, tag)[0]
    assert first == list(range(8))  # one batch first; then its halves, down to the poison one alone
    assert [2] in calls(harness, tag)
    # Their callback records say it as Lambda's would: the event whose exception was returned failed "Handled", the
    # one whose call raised "Unhandled"; the invoke happened for each (200), and a success has no functionError.
    stream = harness.redis.xrange(f"{harness.prefix}:callbacks")
    records = {r["requestContext"]["requestId"]: r["responseContext"] for r in
               (orjson.loads(fields[b"value"]) for _, fields in stream)}  # fmt: skip
    assert records[ids[5]]["functionError"] == "Handled" and records[ids[2]]["functionError"] == "Unhandled"
    assert all(records[i]["statusCode"] == 200 for i in ids) and "functionError" not in records[ids[0]]
    assert all(records[i]["executedVersion"] == "7" for i in ids)  # the version the code declares


def test_cancel_one_event_of_a_running_batch(harness: FleetHarness) -> None:
    """It ignores the cancel (batch handlers rarely check): recorded CANCELLED after cancel_grace_s (2 s), while the
    batch runs on; its neighbours succeed, each run once."""
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    ids = [invoke(cp, tag, n, sleep=5) for n in range(4)]
    harness.wait_for(lambda: all(cp.status(i)["state"] == "RUNNING" for i in ids), what="the batch running")
    assert cp.cancel(ids[1])["outcome"] == "cancelling"
    harness.wait_for(lambda: cp.status(ids[1])["state"] == "CANCELLED", 4, "the cancelled one recorded")
    assert all(cp.status(i)["state"] == "RUNNING" for i in (ids[0], ids[2], ids[3]))
    views = finished(harness, cp, ids)
    assert [v["state"] for v in views] == ["SUCCEEDED", "CANCELLED", "SUCCEEDED", "SUCCEEDED"]
    assert [harness.runs(i) for i in ids] == [1, 1, 1, 1]


def test_each_event_of_a_running_batch_shows_as_its_own_busy_entry_with_its_own_progress(
    harness: FleetHarness,
) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    ids = [invoke(cp, tag, n, sleep=4) for n in range(4)]
    harness.wait_for(lambda: all(cp.status(i)["progress"]["fraction"] > 0 for i in ids), what="the batch running")
    [gpu] = [g for g in overview(cp)["gpus"] if g["task_ids"]]
    assert sorted(gpu["task_ids"]) == sorted(ids) and gpu["task"] == gpu["tasks"][0]
    progress = {t["id"]: (t["progress"], t["progress_message"]) for t in gpu["tasks"]}
    assert sorted(progress.values()) == [(0.25, "event 1 of 4"), (0.5, "event 2 of 4"), (0.75, "event 3 of 4"),
                                         (1, "event 4 of 4")]  # fmt: skip
    assert _tasks(gpu) == f"{gpu['task_ids'][0]} (+3)"  # gpufleet gpus
    finished(harness, cp, ids)


def test_a_worker_killed_mid_batch_runs_each_event_again(harness: FleetHarness) -> None:
    cp = one_worker(harness, lease_s=60)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    ids = [invoke(cp, tag, n, sleep=2) for n in range(5)]
    # Its handler running for each of them (RUNNING is set by the claims, a moment before).
    harness.wait_for(lambda: all(harness.runs(i) == 1 for i in ids), what="the batch running")
    os.kill(int(harness.redis.get(f"pid:{ids[0]}") or 0), signal.SIGKILL)
    killed_at = time.time()
    views = finished(harness, cp, ids, 60)
    for view in views:
        assert view["state"] == "SUCCEEDED" and view["attempts"] == 2 and harness.runs(view["id"]) == 2
    # Re-queued by the watchdog, not after the 60 s lease; and on their second attempt each runs alone (one of them
    # may have killed the process).
    assert min(stamp(view["started_at"]) for view in views) - killed_at < 10
    assert sorted(calls(harness, tag)[1:]) == [[n] for n in range(5)]


def test_a_hanging_event_times_out_alone_and_its_neighbours_succeed(harness: FleetHarness) -> None:
    """The soft time limit stops a call as an exception does: halves, down to the hanging event alone, in the same
    attempt. Each event's progress is its own."""
    cp = one_worker(harness)
    tag, ids = queued_together(harness, cp, "crowd", ["ok", "hang", "ok", "ok"])
    views = finished(harness, cp, ids)
    assert [v["state"] for v in views] == ["SUCCEEDED", "TIMED_OUT", "SUCCEEDED", "SUCCEEDED"]
    assert [v["attempts"] for v in views] == [1, 1, 1, 1]
    assert calls(harness, tag) == [[0, 1, 2, 3], [0, 1], [0], [1], [2, 3]]
    assert views[1]["error"]["errorType"] == "TimedOut"
    progress = [views[i]["progress"] for i in (0, 2, 3)]
    assert [p["message"] for p in progress] == ["event 1 of 1", "event 1 of 2", "event 2 of 2"]


def test_a_batch_handler_that_returns_the_wrong_number_of_results_fails_its_events_with_why(
    harness: FleetHarness,
) -> None:
    cp = one_worker(harness)
    _, ids = queued_together(harness, cp, "crowd", ["short", "short"])
    for view in finished(harness, cp, ids):
        assert view["state"] == "FAILED" and view["attempts"] == 1, view  # a bug in the handler: not retried
        assert view["error"]["errorType"] == "BadBatchResult"
        assert "return a list with one result per event" in view["error"]["errorMessage"]


@pytest.mark.parametrize("mode", ["crash", "stuck"])
# Serial: it kills its process three times, each within a time limit. A neighbour once lost a third attempt here (a
# claim on its way back to the dead process was counted as run): test_engine's claim_on_its_way test covers that.
@pytest.mark.serial
def test_an_event_that_kills_its_process_fails_alone_and_its_neighbours_succeed(harness: FleetHarness,
                                                                                 mode: str) -> None:  # fmt: skip
    """``crash``: the event kills its process (out of memory, a CUDA crash). ``stuck``: it ignores the soft limit,
    and the watchdog kills the process past the hard one. Either way the call's events come back and run alone on
    their next attempt: the bad one does it again alone, its neighbours succeed."""
    cp = one_worker(harness, lease_s=60)
    tag, ids = queued_together(harness, cp, "crowd", ["ok", mode, "ok", "ok"])
    views = finished(harness, cp, ids, 90)
    assert calls(harness, tag)[0] == [0, 1, 2, 3]
    assert all(len(call) == 1 for call in calls(harness, tag)[1:])  # alone from the second attempt on
    for i in (0, 2, 3):
        assert views[i]["state"] == "SUCCEEDED" and views[i]["attempts"] == 2 and harness.runs(ids[i]) == 2
    if mode == "crash":  # each attempt killed its process; the fourth claim gives up
        assert views[1]["state"] == "FAILED" and views[1]["error"]["errorType"] == "WorkerLost"
        assert harness.runs(ids[1]) == 3
    else:  # alone, past the hard limit: timed out
        assert views[1]["state"] == "TIMED_OUT" and harness.runs(ids[1]) == 2


@pytest.mark.serial
def test_a_batch_waits_no_longer_than_max_wait_ms_for_more_and_a_lone_task_not_at_all(harness: FleetHarness) -> None:
    """gather() on real Redis and real claims. Each take() brings one more event, as a steady trickle would: a batch
    of 256 would take over half a second to fill, and stops at max_wait_ms (50) instead. A lone event (nothing more
    queued) starts at once, even with a max_wait_ms of 2 s."""
    fleet = harness.fleet()
    factory = MessageFactory(harness.prefix, 1.0)

    def policy(name: str, max_wait_ms: float, queued: int) -> tuple[Any, str]:
        """A batch function of its own queue, with ``queued`` events in it."""
        fn = dataclasses.replace(fleet.functions["crowd"], name=name, batch=Batch(256, max_wait_ms))
        tasks = [NewTask(factory.build(f"{name}-{uuid.uuid4().hex}", fn, {"n": i}, {"source": "test"}), "", "", 3,
                         "test", time.time(), "test") for i in range(queued)]  # fmt: skip
        assert harness.registry.enqueue_many(tasks) == [Enqueued.CREATED] * queued
        return fn, function_queue(harness.prefix, fn)

    def one_at_a_time(rt: Runtime, queue: str) -> Callable[[int], list[Any]]:
        return lambda n: rt.take([queue], 1, "test-owner")

    trickle, queue = policy("trickle", 50, 300)
    rt = Runtime(fleet, "trickle-worker", "gpu0", [queue])
    [first] = rt.take([queue], 1, "test-owner")
    started = time.monotonic()
    items = batch.gather(first, trickle, one_at_a_time(rt, queue), lambda: False, 256)
    took = time.monotonic() - started
    assert 2 < len(items) < 256 and took < 0.4, (len(items), took)  # unbounded: all 256, in ~0.6 s
    assert len({item.task_id for item in items}) == len(items)

    lone, queue = policy("lone", 2000, 1)
    rt = Runtime(fleet, "lone-worker", "gpu0", [queue])
    [first] = rt.take([queue], 1, "test-owner")
    started = time.monotonic()
    assert batch.gather(first, lone, one_at_a_time(rt, queue), lambda: False, 256) == [first]
    assert time.monotonic() - started < 1


def test_max_event_age_holds_per_event(harness: FleetHarness) -> None:
    cp = one_worker(harness)
    tag = uuid.uuid4().hex
    blocker = cp.invoke("slow", {"seconds": 1}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    fn = harness.fleet().functions["batched"]
    message = MessageFactory(harness.prefix, 1.0).build("old-one", fn, {"tag": tag, "n": 0}, {"source": "test"})
    aged = NewTask(message, "", "", 2, "test", time.time() - 60, max_age_s=fn.max_event_age_s, origin="test")
    assert harness.registry.enqueue_many([aged]) == [Enqueued.CREATED]  # its event is a minute old: past 30 s
    old, fresh = "old-one", invoke(cp, tag, 1)
    views = finished(harness, cp, [old, fresh])
    assert [v["state"] for v in views] == ["EXPIRED", "SUCCEEDED"]
    assert harness.runs(old) == 0
