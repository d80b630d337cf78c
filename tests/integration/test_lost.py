"""No task is lost when its message is: a consumer killed or frozen between Redis handing out a message and
kombu recording it takes the message with it. Such a task runs again within worker.lease_s plus a few seconds."""

from __future__ import annotations

import time

import orjson

from gpufleet.worker.lost import LostMessages
from tests.harness import FleetHarness
from tests.integration.test_registry import enqueue, envelopes


def head_id(h: FleetHarness, queue: str) -> str:
    return str(orjson.loads(h.redis.lindex(queue, -1))["headers"]["id"])


def test_a_task_whose_message_left_the_queue_unclaimed_is_pushed_again_at_the_head(harness: FleetHarness) -> None:
    reg, queue, lst = harness.registry, harness.queue("echo"), harness.queue_list("echo")
    for task_id in ("a", "b", "c", "d"):
        enqueue(harness, task_id)
    assert reg.scan_lost(queue) == []  # all four are in the list
    harness.redis.rpop(lst)  # a consumer popped "a" and died before kombu recorded it
    harness.redis.rpop(lst)  # another popped "b" and claimed it: running, not lost
    assert reg.claim("b", "QUEUED", "", "w/1/1/x", 30, "w", "g").ok
    assert [i for i, _ in reg.scan_lost(queue)] == ["a"]

    lost = LostMessages(reg, grace_s=0.3, envelope_for=envelopes(harness))
    assert lost.tick() == 0  # out of the queue for a moment: it may be in flight to a live worker
    time.sleep(0.4)
    assert lost.tick() == 1
    assert head_id(harness, lst) == "a" and harness.redis.llen(lst) == 3  # next to run
    assert reg.scan_lost(queue) == [] and lost.tick() == 0
    assert reg.get("a")["state"] == "QUEUED" and reg.get("a")["attempts"] == 0

    # Every message gone (an empty list): each pending task has been out of the queue.
    for _ in range(3):
        harness.redis.rpop(lst)
    assert sorted(i for i, _ in reg.scan_lost(queue)) == ["a", "c", "d"]
    # A copy claimed in the meantime is not pushed again: the push compares the position the scan saw.
    [(task_id, score)] = [row for row in reg.scan_lost(queue) if row[0] == "c"]
    assert reg.claim("c", "QUEUED", "", "w/1/1/y", 30, "w", "g").ok
    assert reg.requeue_lost("c", queue, score, envelopes(harness)) is False
    assert harness.redis.llen(lst) == 0


def test_lost_messages_run_on_a_live_fleet_long_before_kombu_would_restore_them(harness: FleetHarness) -> None:
    lst = harness.queue_list("echo")
    ids = [f"{harness.prefix}-m{i}" for i in range(6)]  # runs are counted per id in the shared Redis
    for task_id in ids:
        enqueue(harness, task_id)
    lost = [orjson.loads(harness.redis.rpop(lst))["headers"]["id"] for _ in range(2)]  # taken, then lost
    assert lost == ids[:2]
    harness.start("worker")  # lease_s 3: the lost ones run a few seconds after the others, not in 25 h
    harness.wait_for(lambda: all((harness.registry.get(i) or {}).get("state") == "SUCCEEDED" for i in ids),
                     timeout_s=30, what="every task, the lost ones too")  # fmt: skip
    assert all(harness.runs(i) == 1 for i in ids)
    assert harness.log_text().count("message was lost on its way to a worker") == 2


def test_a_stale_copy_at_the_head_does_not_make_the_tasks_behind_it_look_lost(harness: FleetHarness) -> None:
    """A cancelled task's message stays in the list; retried, the task has a new message at the back. The old copy
    at the head must not mark its place (every task before its new place would look lost)."""
    from gpufleet.control.plane import ControlPlane

    reg, queue, lst = harness.registry, harness.queue("echo"), harness.queue_list("echo")
    for task_id in ("s1", "s2", "s3"):
        enqueue(harness, task_id)
    cp = ControlPlane(harness.fleet(), reg)
    assert cp.cancel("s1")["outcome"] == "cancelled"
    assert cp.retry("s1")["outcome"] == "queued"
    assert harness.redis.llen(lst) == 4 and head_id(harness, lst) == "s1"  # the stale copy, still at the head
    assert reg.scan_lost(queue) == []


def test_tasks_no_supervisor_here_can_rebuild_never_block_the_others(harness: FleetHarness) -> None:
    reg, lst = harness.registry, harness.queue_list("echo")
    build = envelopes(harness)
    for task_id in ("other-1", "other-2", "mine"):
        enqueue(harness, task_id)
    harness.redis.delete(lst)
    for task_id in ("other-1", "other-2", "mine"):  # each failed once and waits for its retry
        assert reg.claim(task_id, "QUEUED", "", f"w/1/1/{task_id}", 30, "w", "g").ok
        assert reg.retry_later(task_id, f"w/1/1/{task_id}", 0.0, {"errorType": "X"})
    reg.client.zadd(reg.keys.delayed, {"gone": 0})  # a due retry whose record expired
    time.sleep(0.05)

    def only_mine(task_id: str, function: str, event: bytes, meta: bytes, queue: str) -> bytes | None:
        return build(task_id, function, event, meta, queue) if task_id == "mine" else None  # the others: not served

    assert reg.housekeep(only_mine, limit=1) == (1, 0)  # read past the two it cannot build, one page at a time
    assert head_id(harness, lst) == "mine"
    assert reg.client.zscore(reg.keys.delayed, "gone") is None  # dropped
    assert {m.decode() for m in reg.client.zrange(reg.keys.delayed, 0, -1)} == {"other-1", "other-2"}  # kept for others
