"""Registry transitions on a real Redis: compare-and-set claims, leases, retries, and the dispatcher's delivery."""

from __future__ import annotations

import threading
import time

import orjson
import pytest
import redis

from gpufleet.delivery.dispatcher import Dispatcher
from gpufleet.delivery.flows import flow_id
from gpufleet.registry.messages import (
    DEFAULT_PRIORITY,
    PRIORITY_STEPS,
    Envelopes,
    MessageFactory,
    function_queue,
    priority_list,
)
from gpufleet.registry.model import Callback, Enqueued, NewTask, State, Taken
from tests.harness import FleetHarness, nonzero


def envelopes(h: FleetHarness) -> Envelopes:
    """What a supervisor uses to push a stored task again."""
    fleet = h.fleet()
    return Envelopes(MessageFactory(h.prefix, 1.0), fleet.functions)


def enqueue(h: FleetHarness, task_id: str, function: str = "echo") -> None:
    fleet = h.fleet()
    factory = MessageFactory(h.prefix, 1.0)
    message = factory.build(task_id, fleet.functions[function], {"k": task_id}, {"source": "test"})
    task = NewTask(message, "kafka:///s", "kafka:///f", 3, "test", time.time(), origin="test")
    assert h.registry.enqueue_many([task]) == [Enqueued.CREATED]


def script_calls(h: FleetHarness) -> dict[str, int]:
    stats = h.registry.client.info("commandstats")
    return {name: int(stats.get(f"cmdstat_{name}", {}).get("calls", 0)) for name in ("script|exists", "evalsha")}


def test_a_pipeline_of_scripts_is_one_round_trip_and_survives_a_lost_script_cache(harness: FleetHarness) -> None:
    """redis-py asks SCRIPT EXISTS before each pipeline that holds a script (a round trip more, between two tasks of a
    worker); the registry's pipelines do not, and a Redis that lost its scripts (restarted) gets them again, each
    command running once."""
    reg = harness.registry
    enqueue(harness, "warm")  # the scripts are loaded
    before = script_calls(harness)
    for n in range(5):
        enqueue(harness, f"p{n}")
    after = script_calls(harness)
    assert after["script|exists"] == before["script|exists"] and after["evalsha"] == before["evalsha"] + 5
    for task_id in ("p0", "p1"):
        assert reg.claim(task_id, "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    reg.client.script_flush()
    pipe = reg.pipeline()
    pipe.set(f"{harness.prefix}:probe", "1")
    reg.finish("p0", "me/1/1/a", State.SUCCEEDED, {"result": b"1"}, [], pipe=pipe)
    pipe.incr(f"{harness.prefix}:probe")
    reg.finish("p1", "me/1/1/a", State.SUCCEEDED, {"result": b"2"}, [], pipe=pipe)
    probe, first, count, second = pipe.execute()
    assert (probe, count) == (True, 2)  # not run twice
    assert first and second
    assert reg.get("p0")["state"] == reg.get("p1")["state"] == "SUCCEEDED"
    bad = reg.pipeline()
    bad.lpush(f"{harness.prefix}:probe", "x")  # a string key: WRONGTYPE
    with pytest.raises(redis.ResponseError, match="Command # 1"):  # an error still raises, as redis-py's does
        bad.execute()


def test_only_one_delivery_can_claim_a_task(harness: FleetHarness) -> None:
    enqueue(harness, "c1")
    reg = harness.registry
    first = reg.claim("c1", "QUEUED", "", "me/1/1/a", 30, "w", "g")
    assert first.ok and first.attempts == 1 and first.max_attempts == 3 and first.on_success == "kafka:///s"
    second = reg.claim("c1", "QUEUED", "", "other/2/2/b", 30, "w", "g")
    assert not second.ok and second.seen_state == "RUNNING"
    assert reg.finish("c1", "other/2/2/b", State.SUCCEEDED, {}, []) is False  # not the owner
    assert reg.finish("c1", "me/1/1/a", State.SUCCEEDED, {"result": b"1"}, []) is True
    assert reg.finish("c1", "me/1/1/a", State.FAILED, {}, []) is False  # never finishes twice
    assert reg.get("c1")["state"] == "SUCCEEDED"
    assert nonzero(reg.counts("echo")) == {"SUCCEEDED": 1}


def test_a_task_that_succeeds_reads_100_percent_whatever_it_reported_last(harness: FleetHarness) -> None:
    enqueue(harness, "p1")
    reg = harness.registry
    assert reg.claim("p1", "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    reg.set_progress("p1", 0.9, "almost")
    assert reg.finish("p1", "me/1/1/a", State.SUCCEEDED, {"result": b"1"}, [])
    record = reg.get("p1")
    assert record["progress"] == 1 and record["progress_message"] == "almost"


def test_a_lapsed_lease_is_requeued_by_housekeeping(harness: FleetHarness) -> None:
    enqueue(harness, "l1")
    reg = harness.registry
    queue = harness.queue_list("echo")
    harness.redis.delete(queue)  # the worker took the message
    assert reg.claim("l1", "QUEUED", "", "gone/1/1/a", 0.3, "w", "g").ok
    assert reg.housekeep(envelopes(harness)) == (0, 0)  # lease still valid
    time.sleep(0.5)
    assert reg.housekeep(envelopes(harness)) == (0, 1)
    rec = reg.get("l1")
    assert rec["state"] == "QUEUED" and rec["last_error"]["errorType"] == "WorkerLost"
    assert harness.redis.llen(queue) == 1
    assert nonzero(reg.counts("echo")) == {"QUEUED": 1}


def test_a_task_taken_back_from_a_dead_worker_goes_to_the_head_of_its_queue(harness: FleetHarness) -> None:
    """It had waited its turn already: it runs next, not behind the backlog that arrived while it ran."""
    from gpufleet.control.plane import ControlPlane

    enqueue(harness, "first")
    queue = harness.queue_list("echo")
    harness.redis.rpop(queue)  # a worker took it...
    reg = harness.registry
    assert reg.claim("first", "QUEUED", "", "gone/1/1/a", 0.2, "w", "g").ok  # ...and died while running it
    for i in range(5):
        enqueue(harness, f"later-{i}")
    time.sleep(0.4)
    assert reg.housekeep(envelopes(harness)) == (0, 1)
    head = orjson.loads(harness.redis.lindex(queue, -1))  # Celery's Redis transport pops from the right
    assert head["headers"]["id"] == "first"
    cp = ControlPlane(harness.fleet(), reg)
    assert [cp.position(i)["position"] for i in ["first", *(f"later-{i}" for i in range(5))]] == [1, 2, 3, 4, 5, 6]


def test_retry_waits_for_its_backoff_then_is_pushed_again(harness: FleetHarness) -> None:
    enqueue(harness, "r1")
    reg = harness.registry
    queue = harness.queue_list("echo")
    harness.redis.delete(queue)
    assert reg.claim("r1", "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    assert reg.retry_later("r1", "me/1/1/a", 0.3, {"errorType": "ValueError"})
    assert reg.housekeep(envelopes(harness)) == (0, 0) and harness.redis.llen(queue) == 0
    time.sleep(0.4)
    assert reg.housekeep(envelopes(harness)) == (1, 0) and harness.redis.llen(queue) == 1
    again = reg.claim("r1", "QUEUED", "", "me/1/1/b", 30, "w", "g")
    assert again.ok and again.attempts == 2


def test_dispatcher_keeps_records_while_kafka_is_down_and_delivers_later(harness: FleetHarness) -> None:
    enqueue(harness, "d1")
    reg = harness.registry
    assert reg.claim("d1", "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    record = orjson.dumps({"requestContext": {"requestId": "d1"}})
    dest = f"kafka:///{harness.topic('success')}"
    assert reg.finish("d1", "me/1/1/a", State.SUCCEEDED, {}, [Callback(dest, record, "Success")])
    stream = f"{harness.prefix}:callbacks"

    # Kafka unreachable: the record stays in the stream, the task is already SUCCEEDED (no GPU waits for Kafka).
    harness.write_config(kafka={"bootstrap_servers": "127.0.0.1:1", "request_timeout_ms": 1000},
                         dispatcher={"retry_backoff_s": 0.1, "retry_backoff_max_s": 0.2})  # fmt: skip
    down = Dispatcher(harness.fleet(), name="d-down")
    stop = threading.Event()
    thread = threading.Thread(target=down.run, args=(stop,))
    thread.start()
    time.sleep(2)
    stop.set()
    thread.join(timeout=30)
    flow = f"{harness.prefix}:flow:{flow_id(dest)}"
    assert down.delivered == 0 and harness.redis.xlen(stream) == 0 and harness.redis.xlen(flow) == 1

    # Kafka back: the next dispatcher takes the flow (the first let go of its lease) and delivers the record once.
    harness.write_config()
    up = Dispatcher(harness.fleet(), name="d-down")
    stop = threading.Event()
    thread = threading.Thread(target=up.run, args=(stop,))
    thread.start()
    harness.wait_for(lambda: up.delivered == 1, what="delivery")
    stop.set()
    thread.join(timeout=30)
    assert harness.redis.xlen(stream) == harness.redis.xlen(flow) == 0
    [out] = harness.records("success", 1)
    assert out["key"] == "d1" and out["headers"] == {"condition": "Success", "function": "echo"}
    assert out["raw"] == record


def test_unreachable_registry_sends_the_message_back_instead_of_dropping_it(harness: FleetHarness) -> None:
    from celery.exceptions import Reject

    from gpufleet.worker.runtime import Runtime

    harness.write_config(redis={"url": "redis://127.0.0.1:1/0"})
    runtime = Runtime(harness.fleet(), worker_name="vgpu0@test", gpu="vgpu0:virtual")
    with pytest.raises(Reject) as rejected:
        runtime.execute("lost-1", "echo", {"x": 1}, {"source": "test"})
    assert rejected.value.requeue


def test_dispatcher_drains_the_stream_when_stopped_cleanly(harness: FleetHarness) -> None:
    enqueue(harness, "drain-1")
    reg = harness.registry
    assert reg.claim("drain-1", "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    dest = f"kafka:///{harness.topic('success')}"
    assert reg.finish("drain-1", "me/1/1/a", State.SUCCEEDED, {}, [Callback(dest, b"{}", "Success")])
    stop = threading.Event()
    stop.set()  # asked to stop before it even started: what is already there still goes out
    dispatcher = Dispatcher(harness.fleet(), name="drainer")
    dispatcher.run(stop)
    assert dispatcher.delivered == 1
    assert [r["key"] for r in harness.records("success", 1)] == ["drain-1"]


def test_cancel_is_atomic_with_claim_and_finish(harness: FleetHarness) -> None:
    from gpufleet.control.plane import ControlPlane

    cp, reg = ControlPlane(harness.fleet(), harness.registry), harness.registry
    queue = harness.queue_list("echo")
    for task_id in ("q1", "q2", "r1"):
        enqueue(harness, task_id)
    # QUEUED: cancelled at once, out of the position index. Its message stays in the list (removing it would scan
    # the list), and the worker it reaches cannot claim it, so a task is never both CANCELLED and run.
    assert cp.cancel("q1")["outcome"] == "cancelled"
    assert harness.redis.llen(queue) == 3 and cp.position("q2")["position"] == 1
    assert not reg.claim("q1", "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    assert harness.redis.ttl(reg.keys.task("q1")) > 0  # retention applies to cancelled records too
    [entry] = harness.redis.xrange(reg.keys.callbacks)
    assert entry[1][b"condition"] == b"Cancelled" and entry[1][b"dest"] == b"kafka:///f"
    assert orjson.loads(entry[1][b"value"])["requestPayload"] == {"k": "q1"}
    # A stale read (the task changed since) is refused by the script rather than applied.
    assert reg.cancel("q2", 5, {}, "", b"")[0] == "conflict"
    # RUNNING: the flag is set; the owner's next renewal extends its lease and reports the cancel (2).
    assert reg.claim("r1", "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    assert cp.cancel("r1") == {"id": "r1", "outcome": "cancelling", "state": "RUNNING"}
    assert reg.renew("r1", "w/1/1/a", 30) == 2 and reg.get("r1")["state"] == "RUNNING"
    # The handler won the race and succeeded: the final state is that one, and cancel is now a no-op.
    assert reg.finish("r1", "w/1/1/a", State.SUCCEEDED, {"result": b"1"}, []) is True
    assert cp.cancel("r1")["outcome"] == "noop"
    assert nonzero(reg.counts("echo")) == {"QUEUED": 1, "CANCELLED": 1, "SUCCEEDED": 1}


def test_manual_retry_requeues_a_finished_failure_only(harness: FleetHarness) -> None:
    reg = harness.registry
    queue = harness.queue_list("echo")
    enqueue(harness, "f1")
    harness.redis.delete(queue)
    envelope = envelopes(harness)("f1", "echo", b'{"k": "f1"}', b"{}") or b""
    assert reg.retry("f1", envelope) == ("conflict", "QUEUED")
    assert reg.claim("f1", "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    assert reg.finish("f1", "w/1/1/a", State.FAILED, {"error": {"errorType": "X"}}, [])
    assert reg.retry("f1", envelope) == ("queued", "FAILED")
    rec = reg.get("f1")
    assert rec["state"] == "QUEUED" and rec["attempts"] == 0 and "error" not in rec and rec["manual_retries"] == 1
    assert harness.redis.ttl(reg.keys.task("f1")) == -1  # no longer expiring while it waits
    assert harness.redis.llen(queue) == 1 and nonzero(reg.counts("echo")) == {"QUEUED": 1}
    assert reg.retry("missing", envelope) == ("missing", "")


def test_listing_pages_newest_first_and_skips_expired_records(harness: FleetHarness) -> None:
    from gpufleet.control.plane import ControlPlane
    from gpufleet.errors import InvalidRequestError

    cp = ControlPlane(harness.fleet(), harness.registry)
    ids = [cp.invoke("echo", {"i": i}).id for i in range(7)]
    cp.invoke("typed", {"n": 1})
    pages, cursor = [], None
    while True:
        page = cp.tasks(function="echo", state="QUEUED", limit=3, cursor=cursor)
        pages.append([t["id"] for t in page["items"]])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert pages == [ids[6:3:-1], ids[3:0:-1], ids[0:1]]
    assert len(cp.tasks(limit=50)["items"]) == 8  # every function, every state
    harness.redis.delete(harness.registry.keys.task(ids[6]))  # as if its retention had passed
    assert [t["id"] for t in cp.tasks(function="echo", limit=3)["items"]] == ids[5:3:-1]  # a short page
    assert harness.redis.zscore(harness.registry.keys.index("echo", State.QUEUED), ids[6]) is None  # tidied
    for bad in ({"state": "DONE"}, {"limit": 0}, {"cursor": "nonsense"}):
        with pytest.raises(InvalidRequestError):
            cp.tasks(**bad)  # type: ignore[arg-type]


def test_a_claimed_task_leaves_the_deadline_index(harness: FleetHarness) -> None:
    """Only a waiting task expires unclaimed; once a worker has it, the worker checks its age itself."""
    fleet = harness.fleet()
    factory = MessageFactory(harness.prefix, 1.0)
    message = factory.build("dl1", fleet.functions["expiring"], {}, {"source": "test"})
    reg = harness.registry
    task = NewTask(message, "kafka:///s", "kafka:///f", 1, "test", time.time(), max_age_s=1.0, origin="test")
    assert reg.enqueue_many([task]) == [Enqueued.CREATED]
    assert reg.client.zscore(reg.keys.deadlines, "dl1") is not None
    assert reg.claim("dl1", "QUEUED", "", "w/1/1/a", 30, "w", "g").ok
    assert reg.client.zscore(reg.keys.deadlines, "dl1") is None


def test_a_worker_waiting_on_its_lists_claims_what_it_pops_and_drops_a_stale_copy(harness: FleetHarness) -> None:
    """Registry.wait_claim (an idle worker's BRPOP, then claim_popped): the task it pops is claimed, with how long it
    waited; another copy of a running task comes back as its id, for the caller to judge; a copy of a finished one
    is dropped; nothing queued: nothing, after the timeout."""
    fleet = harness.fleet()
    queue = function_queue(harness.prefix, fleet.functions["echo"])
    lists = [priority_list(queue, p) for p in reversed(PRIORITY_STEPS)]
    assert harness.registry.wait_claim(lists, 0.05, "w/1/2/a", 30, "w", "gpu0") == []
    enqueue(harness, "popped")
    [envelope] = harness.redis.lrange(priority_list(queue, DEFAULT_PRIORITY), 0, -1)
    [taken] = harness.registry.wait_claim(lists, 1, "w/1/2/a", 30, "w", "gpu0")
    assert isinstance(taken, Taken) and taken.task_id == "popped" and taken.event == {"k": "popped"}
    assert taken.claim.attempts == 1 and taken.claim.waited_s is not None and 0 <= taken.claim.waited_s < 60
    assert harness.registry.get("popped")["state"] == "RUNNING"  # type: ignore[index]
    assert harness.registry.position("popped", queue) is None  # out of its queue's pending tasks
    harness.redis.lpush(priority_list(queue, DEFAULT_PRIORITY), envelope)  # a copy, delivered again
    assert harness.registry.wait_claim(lists, 1, "w/1/2/b", 30, "w", "gpu0") == ["popped"]
    assert harness.registry.finish("popped", "w/1/2/a", State.SUCCEEDED, {"result": "{}"}, [])
    harness.redis.lpush(priority_list(queue, DEFAULT_PRIORITY), envelope)
    assert harness.registry.wait_claim(lists, 1, "w/1/2/c", 30, "w", "gpu0") == []  # stale: dropped
    assert harness.redis.llen(priority_list(queue, DEFAULT_PRIORITY)) == 0
    assert harness.registry.get("popped")["state"] == "SUCCEEDED"  # type: ignore[index]
