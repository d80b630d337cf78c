"""The AMQP trigger against a real RabbitMQ, Redis and Kafka: what every trigger promises (the TriggerContract the
other sources will share), plus S3 notifications from a queue.

Each test runs the trigger in a thread of its own and looks at the queue with a second connection: ``ready`` is
what waits in the queue, ``unacked`` what a consumer holds.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gpufleet.triggers.amqp import AmqpTrigger
from tests.harness import FleetHarness
from tests.test_object_push import aws_record, s3_test_event


class Broker:
    def __init__(self, url: str) -> None:
        import amqp

        self.url = url
        host = url.split("@", 1)[1].rstrip("/")
        self.conn = amqp.Connection(host, userid="guest", password="guest")
        self.conn.connect()
        self.channel = self.conn.channel()

    def queue(self) -> str:
        name = f"q-{uuid.uuid4().hex[:10]}"
        self.channel.queue_declare(name, durable=True, auto_delete=False)
        return name

    def send(self, queue: str, *bodies: bytes, **properties: Any) -> None:
        import amqp

        for body in bodies:
            self.channel.basic_publish(amqp.Message(body, delivery_mode=2, **properties), routing_key=queue)

    def ready(self, queue: str) -> int:
        count: int = self.channel.queue_declare(queue, passive=True).message_count
        return count

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def broker(rabbitmq: str) -> Iterator[Broker]:
    b = Broker(rabbitmq)
    try:
        yield b
    finally:
        b.close()


class Running:
    """A trigger in a thread; ``stop()`` sets its stop event and waits for it."""

    def __init__(self, trigger: AmqpTrigger) -> None:
        self.trigger, self.stop_event = trigger, threading.Event()
        self.thread = threading.Thread(target=trigger.run, args=(self.stop_event,), daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(30)
        assert not self.thread.is_alive()


def amqp_trigger(harness: FleetHarness, broker: Broker, queue: str, **settings: Any) -> AmqpTrigger:
    harness.write_config(triggers={"rabbit": {"source": f"{broker.url}?queue={queue}", "batch_max": 50, **settings}})
    fleet = harness.fleet()
    return AmqpTrigger(fleet, fleet.triggers["rabbit"])


def tasks(harness: FleetHarness, *ids: str) -> list[dict[str, Any] | None]:
    return [harness.registry.get(f"rabbit:{i}") for i in ids]


def routed(i: int, id_: str | None = None) -> bytes:
    return orjson.dumps({"function": "echo", "payload": {"i": i}, **({"id": id_} if id_ else {})})


def test_each_message_is_published_once_then_acknowledged(harness: FleetHarness, broker: Broker) -> None:
    queue = broker.queue()
    broker.send(queue, *(routed(i, f"m{i}") for i in range(120)))
    running = Running(amqp_trigger(harness, broker, queue))
    try:
        harness.wait_for(lambda: all(tasks(harness, *(f"m{i}" for i in range(120)))), what="120 tasks")
        harness.wait_for(lambda: broker.ready(queue) == 0, what="an empty queue")
    finally:
        running.stop()
    assert broker.ready(queue) == 0  # acknowledged: nothing came back when the trigger let go
    assert running.trigger.stats["published"] == 120 and running.trigger.stats["duplicates"] == 0


def test_malformed_input_is_dead_lettered_and_intake_goes_on(harness: FleetHarness, broker: Broker) -> None:
    queue = broker.queue()
    broker.send(queue, b"{not json", routed(1, "after-bad"), orjson.dumps({"function": "nope", "payload": {}}))
    running = Running(amqp_trigger(harness, broker, queue))
    try:
        harness.wait_for(lambda: tasks(harness, "after-bad")[0], what="the good message's task")
        letters = harness.wait_for(lambda: len(recs := harness.records("dlq", 2, timeout_s=5)) >= 2 and recs,
                                   what="two dead letters")  # fmt: skip
        assert {r["headers"]["reason"] for r in letters} == {"malformed_json", "unknown_function"}
        assert b"{not json" in [r["raw"] for r in letters]
        harness.wait_for(lambda: broker.ready(queue) == 0, what="an empty queue")
    finally:
        running.stop()


def test_a_trigger_that_dies_before_acknowledging_loses_nothing(harness: FleetHarness, broker: Broker) -> None:
    """Published, then the connection drops before the ack (a crash): RabbitMQ delivers the batch again, and the
    next trigger finds every task there already."""
    queue = broker.queue()
    broker.send(queue, *(routed(i) for i in range(30)))  # no ids: the default id must be stable across deliveries
    dying = amqp_trigger(harness, broker, queue)
    crashed = threading.Event()

    def crash(batch: Any) -> None:
        dying._conn.collect()  # the socket goes without a word, as when the process is killed
        crashed.set()
        raise ConnectionError("killed between publish and ack")

    dying.ack = crash  # type: ignore[method-assign]
    first = Running(dying)
    harness.wait_for(crashed.is_set, what="the crash")
    first.stop()
    assert dying.stats["published"] == 30
    harness.wait_for(lambda: broker.ready(queue) == 30, what="the batch back in the queue")
    second = Running(amqp_trigger(harness, broker, queue))
    try:
        harness.wait_for(lambda: second.trigger.stats["duplicates"] == 30, what="30 duplicates suppressed")
        harness.wait_for(lambda: broker.ready(queue) == 0, what="an empty queue")
    finally:
        second.stop()
    assert second.trigger.stats["published"] == 0
    assert sum(harness.registry.counts("echo").values()) == 30


def test_a_stop_while_publishing_acknowledges_nothing(harness: FleetHarness, broker: Broker) -> None:
    """Redis cannot be reached: the publish retries until stop, and the batch goes back to the queue."""
    queue = broker.queue()
    broker.send(queue, *(routed(i) for i in range(5)))
    harness.write_config(triggers={"rabbit": {"source": f"{broker.url}?queue={queue}"}},
                         redis={"url": "redis://127.0.0.1:1/0"})  # fmt: skip
    fleet = harness.fleet()
    trigger = AmqpTrigger(fleet, fleet.triggers["rabbit"])
    running = Running(trigger)
    time.sleep(3)  # received and retrying the publish
    running.stop()
    assert trigger.stats["published"] == 0
    harness.wait_for(lambda: broker.ready(queue) == 5, what="all five back in the queue")


def test_s3_notifications_from_a_queue_run_and_test_events_are_acknowledged(harness: FleetHarness,
                                                                            broker: Broker) -> None:  # fmt: skip
    """MinIO's AMQP target and Ceph's AMQP push endpoint send S3 records; filtered ones and TestEvents are
    acknowledged without a dead letter."""
    queue = broker.queue()
    bucket = f"b-{harness.prefix.lower()}"
    wanted, filtered = aws_record(bucket, "in/cat.jpg", "image/jpeg"), aws_record(bucket, "in/notes.txt", "text/plain")
    broker.send(queue, orjson.dumps(s3_test_event(bucket)), orjson.dumps({"Records": [wanted]}),
                orjson.dumps({"Records": [filtered]}))  # fmt: skip
    running = Running(amqp_trigger(harness, broker, queue, format="s3", function="echo", suffix=".jpg"))
    try:
        harness.wait_for(lambda: running.trigger.stats["published"] == 1, what="the .jpg task")
        harness.wait_for(lambda: broker.ready(queue) == 0, what="an empty queue")
    finally:
        running.stop()
    assert running.trigger.stats["ignored"] == 2 and running.trigger.stats["dead_lettered"] == 0
