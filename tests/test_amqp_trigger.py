"""The AMQP trigger against a real RabbitMQ, Redis and Kafka, beyond what every trigger promises (that is
``tests/test_trigger_contract.py``): the default id of a message without one is stable across redeliveries.

Each test runs the trigger in a thread of its own and looks at the queue with a second connection: ``ready`` is
what waits in the queue, ``unacked`` what a consumer holds.
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gpufleet.triggers.amqp import AmqpTrigger
from tests.harness import FleetHarness


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


def routed(i: int, id_: str | None = None) -> bytes:
    return orjson.dumps({"function": "echo", "payload": {"i": i}, **({"id": id_} if id_ else {})})


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
