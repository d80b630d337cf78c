"""Priorities: higher runs first within a queue, positions say so, aging starves nobody, and every source can set one.

Against real Redis, real worker processes and the real trigger code.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

import orjson
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.errors import InvalidRequestError
from gpufleet.registry.store import Registry
from tests.harness import FleetHarness
from tests.integration.test_registry import envelopes


def invoke(cp: ControlPlane, priority: int, key: str) -> str:
    return cp.invoke("echo", {"key": key}, idempotency_key=key, priority=priority).id


def head_level(h: FleetHarness, task_id: str) -> int | None:
    """The priority list that holds the task's message now."""
    for priority in range(10):
        for raw in h.redis.lrange(h.queue_list("echo", priority), 0, -1):
            if orjson.loads(raw)["headers"]["id"] == task_id:
                return priority
    return None


def test_higher_priority_runs_first_and_positions_say_so(harness: FleetHarness) -> None:
    harness.write_config(worker={"virtual_gpus": 1})
    harness.start("worker")
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: cp.gpus(), what="the worker's inventory")
    blocker = cp.invoke("slow", {"seconds": 3}).id
    harness.wait_for(lambda: cp.status(blocker)["state"] == "RUNNING", what="the blocker running")
    order = [("p2", 2), ("p7a", 7), ("p4", 4), ("p7b", 7), ("p9", 9), ("p0", 0)]
    ids = {key: invoke(cp, priority, key) for key, priority in order}
    expected = ["p9", "p7a", "p7b", "p4", "p2", "p0"]
    assert [cp.position(ids[k])["position"] for k in expected] == [1, 2, 3, 4, 5, 6]
    assert cp.status(ids["p9"])["priority"] == 9
    assert cp.queue("echo")["length"] == 6
    # The message sits in the list of its level: kombu's name, read by stock Celery.
    assert head_level(harness, ids["p7a"]) == 7 and head_level(harness, ids["p0"]) == 0
    harness.wait_for(lambda: all(cp.status(i)["state"] == "SUCCEEDED" for i in ids.values()), what="all done")
    started = sorted(ids, key=lambda k: cp.status(ids[k])["started_at"])
    assert started == expected


def test_aging_moves_a_waiting_task_up_one_level_at_a_time_until_it_runs(harness: FleetHarness) -> None:
    """The rule: after each ``priority_aging_s`` at its level, a task moves to the back of the next level. With a
    steady flood of priority-9 tasks, a priority-0 one still reaches the top, and from there its turn comes."""
    harness.write_config(defaults={"priority_aging_s": 0.2})
    reg, cp = harness.registry, ControlPlane(harness.fleet())
    low = invoke(cp, 0, "low")
    levels = [head_level(harness, low)]
    for i in range(12):
        invoke(cp, 9, f"flood-{i}")  # arrives after the low one, and still outranks it while it is low
        time.sleep(0.21)
        reg.age(0.2)
        levels.append(head_level(harness, low))
    assert levels[0] == 0 and levels[-1] == 9
    assert levels == sorted(levels) and all(b - a <= 1 for a, b in itertools.pairwise(levels))
    # At the top it queues behind the priority-9 tasks that were there before it, and ahead of the later ones.
    top = levels.index(9)  # floods 0 .. top-1 came before it reached the top
    assert cp.position(low)["position"] == top + 1
    later = invoke(cp, 9, "later")
    assert cp.position(later)["position"] == 14
    record = reg.get(low)
    assert record["priority"] == 0 and record["prio"] == 9  # asked for 0; aged to 9
    # The message moved with it: its envelope says the level of the list it is in (kombu restores by it).
    [raw] = [m for m in harness.redis.lrange(harness.queue_list("echo", 9), 0, -1)
             if orjson.loads(m)["headers"]["id"] == low]  # fmt: skip
    assert orjson.loads(raw)["properties"]["priority"] == 0  # kombu's scale: 0 is the top


def test_a_low_priority_task_runs_under_a_flood_of_high_ones_that_never_lets_up(harness: FleetHarness) -> None:
    """End to end: a worker and its supervisor, which ages the queues every second (priority_aging_s 0.3), and
    priority-9 tasks of the same function kept queued until the priority-0 one has run. It runs while some of them
    still wait: it was not left for when the flood ends."""
    harness.write_config(defaults={"priority_aging_s": 0.3}, worker={"virtual_gpus": 1})
    harness.start("worker")
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: [g for g in cp.gpus() if g["up"]], what="the worker ready")
    flood = [cp.invoke("slow", {"seconds": 0.2}, priority=9).id for _ in range(5)]
    low = cp.invoke("slow", {"seconds": 0.2}, priority=0).id
    deadline = time.monotonic() + 40
    while cp.status(low)["state"] != "SUCCEEDED":
        assert time.monotonic() < deadline, f"the priority-0 task starved: {cp.status(low)}"
        if harness.registry.counts("slow").get("QUEUED", 0) < 6:  # always more priority-9 work than the GPU does
            flood.append(cp.invoke("slow", {"seconds": 0.2}, priority=9).id)
        time.sleep(0.05)
    ran_at = cp.status(low)["started_at"]
    overtaken = [i for i in flood if (v := cp.status(i))["queued_at"] < ran_at < (v["started_at"] or "~")]
    assert overtaken, "no priority-9 task was still waiting when the priority-0 one ran"
    assert cp.status(low)["priority"] == 0  # its record keeps what it asked for


def test_two_functions_of_one_pool_and_model_have_exact_positions_and_lengths_of_their_own(
    harness: FleetHarness,
) -> None:
    """echo and slow share the pool and the GPU model: each has its own queue, and a task's position and its queue's
    length count only its own function's tasks, priorities included."""
    cp = ControlPlane(harness.fleet())
    echo = [cp.invoke("echo", {"n": n}, priority=p).id for n, p in enumerate([4, 9, 4])]
    slow = [cp.invoke("slow", {"n": n}).id for n in range(5)]
    assert [cp.position(i)["position"] for i in echo] == [2, 1, 3]
    assert [cp.position(i)["position"] for i in slow] == [1, 2, 3, 4, 5]
    assert {cp.position(i)["queue_length"] for i in echo} == {3}
    assert {cp.position(i)["queue_length"] for i in slow} == {5}
    assert cp.queue("echo")["length"] == 3 and cp.queue("slow")["length"] == 5
    assert cp.queue("echo")["queue"] != cp.queue("slow")["queue"]


def test_a_retry_starts_again_from_the_priority_it_asked_for(harness: FleetHarness) -> None:
    reg = harness.registry
    cp = ControlPlane(harness.fleet(), reg)
    task_id = invoke(cp, 1, "r")
    harness.redis.delete(harness.queue_list("echo", 1))  # a worker took it...
    reg.client.hset(reg.keys.task(task_id), "prio", 6)  # ...after it had aged to 6
    assert reg.claim(task_id, "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    assert reg.retry_later(task_id, "w/1/1/a", 0.0, {"errorType": "X"})
    assert reg.housekeep(envelopes(harness)) == (1, 0)
    assert head_level(harness, task_id) == 1 and reg.get(task_id)["prio"] == 1


@pytest.mark.parametrize("how", ["lease lapsed", "handed back"])
def test_a_task_taken_out_before_an_aging_pass_goes_back_at_its_earned_level(harness: FleetHarness, how: str) -> None:
    """The chaos run's finding: a task whose worker was killed just after an aging pass started again 12.6 s later,
    behind 776 tasks queued after it. While it ran it was in no list, so the aging pass lifted everything queued
    with it but not it, and the re-queue put it back at its old level, under all of them."""
    harness.write_config(defaults={"priority_aging_s": 0.3})
    reg = Registry.for_fleet(harness.fleet().settings)
    cp = ControlPlane(harness.fleet(), reg)
    first = invoke(cp, 4, "first")
    backlog = [invoke(cp, 4, f"later-{i}") for i in range(20)]
    assert orjson.loads(harness.redis.rpop(harness.queue_list("echo", 4)))["headers"]["id"] == first  # taken...
    assert reg.claim(first, "QUEUED", "", "w/1/1/a", 0.5, "w", "g").ok  # ...and run
    for _ in range(2):  # two aging passes while it runs: the backlog is two levels up
        time.sleep(0.35)
        reg.age(0.3)
    assert {head_level(harness, t) for t in backlog} == {6}
    if how == "lease lapsed":
        time.sleep(0.2)  # its worker died (SIGKILL): the lease lapses, the housekeeper re-queues it
        assert reg.housekeep(envelopes(harness)) == (0, 1)
    else:
        assert reg.hand_back(first, "w/1/1/a", envelopes(harness), None)  # given back unstarted
    # Its level is its priority plus one per priority_aging_s since it was first queued: at least the backlog's.
    earned = head_level(harness, first)
    assert earned in (6, 7, 8) and reg.get(first)["prio"] == earned
    assert cp.position(first)["position"] == 1  # before: 21, behind every task queued after it
    time.sleep(0.35)
    reg.age(0.3)  # and it ages on from there, still first
    assert head_level(harness, first) == earned + 1 and cp.position(first)["position"] == 1


def test_a_lost_message_of_a_lower_level_is_found(harness: FleetHarness) -> None:
    reg: Registry = harness.registry
    cp = ControlPlane(harness.fleet(), reg)
    high, low = invoke(cp, 8, "high"), invoke(cp, 3, "low")
    queue = harness.queue("echo")
    assert reg.scan_lost(queue) == []
    harness.redis.rpop(harness.queue_list("echo", 3))  # popped by a consumer that died at once
    assert [i for i, _ in reg.scan_lost(queue)] == []  # the high one is in sight and ahead: no verdict on the low
    harness.redis.rpop(harness.queue_list("echo", 8))
    assert sorted(i for i, _ in reg.scan_lost(queue)) == sorted([high, low])


def test_invoke_refuses_a_priority_out_of_range(harness: FleetHarness) -> None:
    cp = ControlPlane(harness.fleet())
    with pytest.raises(InvalidRequestError) as err:
        cp.invoke("echo", {}, priority=10)
    assert err.value.code == "bad_priority"


@pytest.mark.parametrize(
    ("trigger", "headers", "body", "expected"),
    [
        ({}, [], {"function": "echo", "payload": {}}, 4),
        ({"priority": 2}, [], {"function": "echo", "payload": {}}, 2),
        ({"priority": 2}, [("gpufleet-priority", b"8")], {"function": "echo", "payload": {}}, 8),
        ({}, [], {"function": "echo", "payload": {}, "priority": 6}, 6),
        ({"function": "echo", "priority_field": "urgency"}, [], {"urgency": 9, "x": 1}, 9),
        ({}, [("gpufleet-priority", b"12")], {"function": "echo", "payload": {}}, "bad_priority"),
        ({}, [], {"function": "echo", "payload": {}, "priority": "high"}, "bad_priority"),
    ],
)
def test_a_trigger_takes_the_priority_from_header_field_or_its_file(
    harness: FleetHarness, trigger: dict[str, Any], headers: list[tuple[str, bytes]], body: Any, expected: Any
) -> None:
    from gpufleet.triggers.ingest import Ingest, SourceMessage
    from gpufleet.triggers.kafka import KafkaSettings

    harness.write_config()
    settings = KafkaSettings(name="requests", source="kafka:///requests", **trigger)
    ingest = Ingest(harness.fleet(), settings, harness.registry)
    msg = SourceMessage(orjson.dumps(body), "kafka:requests/0/1", "d1", headers=dict(headers))
    batch = ingest.prepare([msg])
    if isinstance(expected, str):
        [dead] = batch.dead
        assert dead.headers["reason"] == expected and "0 to 9" in dead.headers["detail"]
    else:
        [task] = batch.tasks
        assert task.message.priority == expected
        assert orjson.loads(task.message.envelope)["properties"]["priority"] == 9 - expected


def test_a_worker_takes_the_highest_level_across_its_queues_and_a_lost_head_blocks_no_other_queue(
    harness: FleetHarness,
) -> None:
    """``pop_claim`` finds the level to read from each queue's pending head (one read per queue, not one per level):
    across echo's and slow's queues it takes the highest level first, queue order breaking ties. A queue whose head
    message is gone (in a dead consumer's hands) is left to Celery's BRPOP and the lost-message scan, without holding up
    the next queue, nor the queue's lower levels."""
    reg: Registry = harness.registry
    cp = ControlPlane(harness.fleet(), reg)
    queues = [harness.queue("echo"), harness.queue("slow")]
    echo = {p: cp.invoke("echo", {"p": p}, priority=p).id for p in (2, 6)}
    slow = {p: cp.invoke("slow", {"p": p}, priority=p).id for p in (6, 9, 1)}

    def take() -> str | None:
        _, taken = reg.pop_claim(queues, "me/1/1/a", 30, "w", "g")
        assert all(not isinstance(t, str) for t in taken)
        return taken[0].task_id if taken else None  # type: ignore[union-attr]

    assert take() == slow[9]
    assert take() == echo[6]  # level 6 in both queues: echo's is read first
    harness.redis.rpop(harness.queue_list("slow", 6))  # slow's head message, popped by a consumer that died
    assert take() == echo[2]
    assert take() == slow[1]  # past the lost head, one level at a time
    assert take() is None
    assert [i for i, _ in reg.scan_lost(queues[1])] == [slow[6]]
