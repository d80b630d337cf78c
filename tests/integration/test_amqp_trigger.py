"""The AMQP trigger against a real RabbitMQ, Redis and Kafka, beyond what every trigger promises (that is
``tests/contracts/test_trigger_contract.py``): the default id of a message without one is stable across redeliveries, a
broker that vanishes without closing the connection is found by heartbeats, and a restarted broker loses nothing.

Each test runs the trigger in a thread of its own and looks at the queue with a second connection: ``ready`` is
what waits in the queue, ``unacked`` what a consumer holds.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from prometheus_client.parser import text_string_to_metric_families

from gpufleet.api.metrics import exposition
from gpufleet.dev.services import free_port
from gpufleet.triggers.amqp import AmqpTrigger
from tests.amqpwire import PROPERTIES, RawPublisher, content_headers, nested_array, table
from tests.conftest import IN_CI
from tests.harness import FleetHarness
from tests.integration.test_cli_control import cli

pytestmark = pytest.mark.xdist_group("rabbitmq")  # with every test of the session's RabbitMQ, on one worker


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


def test_a_message_priority_is_the_task_priority(harness: FleetHarness, broker: Broker) -> None:
    """AMQP's own priority property (0-255) becomes the task's (0-9: higher is capped at 9); without one, the
    trigger's."""
    queue = broker.queue()
    broker.send(queue, routed(0, "none"))
    broker.send(queue, routed(1, "seven"), priority=7)
    broker.send(queue, routed(2, "high"), priority=200)
    running = Running(amqp_trigger(harness, broker, queue, priority=2))
    try:
        harness.wait_for(lambda: running.trigger.stats["published"] == 3, what="3 tasks published")
    finally:
        running.stop()
    priorities = {i: harness.registry.get(f"rabbit:{i}")["priority"] for i in ("none", "seven", "high")}
    assert priorities == {"none": 2, "seven": 7, "high": 9}


class Partition:
    """A TCP proxy to RabbitMQ whose open connections can be cut silently (:meth:`cut`): from then on no byte passes
    either way, and neither side hears a close, as when a host goes down or the network splits. New connections
    pass as before."""

    def __init__(self, upstream: tuple[str, int]) -> None:
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.cut_ids: set[int] = set()
        self.open_ids: set[int] = set()
        self.sockets: list[socket.socket] = []
        self.last_forward = time.monotonic()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        n = 0
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            server = socket.create_connection(self.upstream)
            self.sockets += [client, server]
            n += 1
            self.open_ids.add(n)
            for src, dst in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(n, src, dst), daemon=True).start()

    def _pump(self, n: int, src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if n not in self.cut_ids:
                    dst.sendall(data)
                    self.last_forward = time.monotonic()
            if n not in self.cut_ids:
                dst.shutdown(socket.SHUT_WR)

    def cut(self) -> None:
        """Once what was written has passed (no byte for 0.1 s): a test cuts after an ack, not before it arrives."""
        deadline = time.monotonic() + 5
        while time.monotonic() - self.last_forward < 0.1 and time.monotonic() < deadline:
            time.sleep(0.02)
        self.cut_ids |= self.open_ids

    def close(self) -> None:
        self.listener.close()
        for s in self.sockets:
            s.close()


def test_a_broker_that_vanishes_without_a_word_is_noticed_by_heartbeats(harness: FleetHarness,
                                                                         broker: Broker) -> None:  # fmt: skip
    """The connection is cut silently: without heartbeats the trigger would wait on it for ever. With them, both
    sides give it up within two intervals, RabbitMQ puts back what it had sent into the void, and the trigger's
    new connection takes it."""
    queue = broker.queue()
    port = int(broker.url.rsplit(":", 1)[1].strip("/"))
    partition = Partition(("127.0.0.1", port))
    harness.write_config(triggers={"rabbit": {
        "source": f"amqp://guest:guest@127.0.0.1:{partition.port}/?queue={queue}&heartbeat_s=1"}})  # fmt: skip
    fleet = harness.fleet()
    running = Running(AmqpTrigger(fleet, fleet.triggers["rabbit"]))
    try:
        broker.send(queue, *(routed(i, f"before-{i}") for i in range(3)))
        harness.wait_for(lambda: running.trigger.stats["published"] == 3 and not running.trigger._unacked,
                         what="3 tasks, acknowledged")  # fmt: skip
        partition.cut()
        broker.send(queue, *(routed(i, f"after-{i}") for i in range(3)))
        harness.wait_for(lambda: running.trigger.stats["published"] == 6, timeout_s=30,
                         what="the 3 sent after the cut, through a new connection")  # fmt: skip
    finally:
        running.stop()
        partition.close()
    assert running.trigger.stats["duplicates"] == 0 and broker.ready(queue) == 0


def test_a_restarted_broker_is_reconnected_and_nothing_is_lost(harness: FleetHarness, tmp_path: Path) -> None:
    """RabbitMQ stops under a running trigger and comes back (same port and data): the trigger reconnects with
    backoff, and what was sent before and after the restart all becomes tasks, once."""
    from gpufleet.dev.rabbitmq import start_rabbitmq, stop_rabbitmq

    port = free_port()
    service, pids = start_rabbitmq(tmp_path / "rabbit", port)
    queue = None
    running = None
    try:
        own = Broker(service.url)
        queue = own.queue()
        own.send(queue, *(routed(i, f"before-{i}") for i in range(3)))
        own.close()
        running = Running(amqp_trigger(harness, own, queue))
        harness.wait_for(lambda: running.trigger.stats["published"] == 3, what="3 tasks")
        stop_rabbitmq(pids)
        service, pids = start_rabbitmq(tmp_path / "rabbit", port)
        own = Broker(service.url)
        own.send(queue, *(routed(i, f"after-{i}") for i in range(3)))
        harness.wait_for(lambda: running.trigger.stats["published"] == 6, timeout_s=60,
                         what="the 3 sent after the restart")  # fmt: skip
        harness.wait_for(lambda: own.ready(queue) == 0, what="an empty queue")
        own.close()
    finally:
        if running is not None:
            running.stop()
        stop_rabbitmq(pids)
    assert sum(harness.registry.counts("echo").values()) == 6


# -- poison: no message, whatever its frames hold, ends the trigger ------------------------------------------------


def dead_letters(harness: FleetHarness, n: int) -> list[dict[str, Any]]:
    return harness.records("dlq", n, timeout_s=60)


def test_properties_py_amqp_cannot_decode_and_an_oversized_body_are_dead_lettered_and_acked(
    harness: FleetHarness, broker: Broker
) -> None:
    """Before: each of these raised inside drain_events (ValueError, OverflowError, RecursionError), ended every
    trigger of the process, and came back after each restart, never acknowledged."""
    queue = broker.queue()
    wire = RawPublisher(broker.url.split("@", 1)[1].rstrip("/"))
    headers = 1 << (15 - PROPERTIES.index(("headers", "F")))
    stamp = 1 << (15 - PROPERTIES.index(("timestamp", "T")))
    poison = [
        (table([(b"sent", b"T" + struct.pack(">Q", 253402300800 * 10))]), headers),  # a timestamp past year 9999
        (table([(b"sent", b"T" + struct.pack(">Q", 2**64 - 1))]), headers),
        (table([(b"deep", nested_array(5000))]), headers),
    ]
    try:
        for i, (properties, flags) in enumerate(poison):
            assert wire.publish(queue, properties, flags, routed(i))
        # The message's own timestamp property out of any calendar: read as none, the task still made.
        assert wire.publish(queue, struct.pack(">Q", 2**64 - 1), stamp, routed(7, "odd-stamp"))
        assert wire.publish(queue, b"", 0, orjson.dumps({"function": "echo", "payload": "x" * 10_000}))  # > 4096
        assert wire.publish(queue, b"", 0, routed(1, "still-fine"))
    finally:
        wire.close()
    running = Running(amqp_trigger(harness, broker, queue, max_payload_bytes=4096))
    try:
        letters = dead_letters(harness, 4)
        harness.wait_for(lambda: broker.ready(queue) == 0 and running.trigger.stats["published"] == 2,
                         what="every message taken")  # fmt: skip
        assert running.thread.is_alive()
    finally:
        running.stop()
    reasons = sorted(r["headers"]["reason"] for r in letters)
    assert reasons == ["bad_amqp_properties"] * 3 + ["oversize"], reasons
    details = " ".join(r["headers"]["detail"] for r in letters)
    assert "ValueError" in details and "OverflowError" in details and "RecursionError" in details
    assert harness.registry.get("rabbit:still-fine") is not None and harness.registry.get("rabbit:odd-stamp")


def test_hostile_frames_never_end_the_trigger_and_every_message_is_a_task_or_a_dead_letter(
    harness: FleetHarness, broker: Broker
) -> None:
    """10,000 messages with hypothesis-made properties and bodies, written as raw frames: each one the broker takes
    ends as a task or a dead letter, and the queue empties, with the one trigger alive throughout."""
    messages: list[tuple[tuple[bytes, int], bytes]] = []
    # Bodies: a task, any bytes, one over the limit (the intake fuzzers in test_intake.py attack the JSON itself).
    bodies = st.one_of(st.integers(0, 10**9).map(routed), st.binary(max_size=64), st.just(b"{}" + b" " * 5000))

    # Drawn before the trigger runs: hypothesis checks that nothing else moves the random module while it draws.
    @settings(max_examples=200, deadline=None, database=None, derandomize=IN_CI, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(st.lists(st.tuples(content_headers(), bodies), min_size=50, max_size=50))
    def collect(batch: list[tuple[tuple[bytes, int], bytes]]) -> None:
        messages.extend(batch)

    collect()
    assert len(messages) >= 10_000
    queue = broker.queue()
    wire = RawPublisher(broker.url.split("@", 1)[1].rstrip("/"))
    running = Running(amqp_trigger(harness, broker, queue, max_payload_bytes=4096))
    stats = running.trigger.stats
    taken = lambda: sum(stats[k] for k in ("published", "duplicates", "dead_lettered", "ignored"))  # noqa: E731
    try:
        accepted = sum(wire.publish(queue, properties, flags, body) for (properties, flags), body in messages)
        assert running.thread.is_alive()
        harness.wait_for(lambda: broker.ready(queue) == 0 and taken() >= accepted, timeout_s=120,
                         what="every accepted message taken")  # fmt: skip
        assert running.thread.is_alive()
    finally:
        running.stop()
        wire.close()
    # RabbitMQ itself refuses some (a property list that is not one, a header type it does not know): ~30%.
    assert accepted + wire.refused == len(messages) and accepted >= len(messages) // 2, (accepted, wire.refused)
    assert taken() == accepted and stats["dead_lettered"] > 0 and stats["published"] > 0, stats


def test_the_backlog_is_in_metrics_and_in_check(harness: FleetHarness, broker: Broker) -> None:
    """Ready in the queue, and held by the trigger unacknowledged: as the Kafka trigger's lag, in metrics and check."""
    queue = broker.queue()
    broker.send(queue, *(routed(i) for i in range(12)))
    trigger = amqp_trigger(harness, broker, queue, batch_max=5)  # a prefetch window of 5
    trigger.connect()
    try:
        batch = trigger.receive(threading.Event())
        assert batch is not None and len(batch.messages) == 5
        trigger._report_lag()
    finally:
        trigger.disconnect()
    text = exposition(harness.fleet(), harness.registry).decode()
    [sample] = [s for family in text_string_to_metric_families(text) for s in family.samples
                if s.name == "gpufleet_trigger_source_depth_messages" and s.labels["state"] == "ready"]  # fmt: skip
    assert sample.labels["trigger"] == "rabbit" and sample.value == 7
    checked = cli(harness, "check")
    assert checked.returncode == 0 and "[backlog: ready 7, unacked 5" in checked.stdout, checked.stdout
