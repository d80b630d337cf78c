"""What every trigger promises, run against each source on its real server (kombu's ``t/integration/common.py`` is
the model): Kafka (tansu), SQS (moto), polling (moto's S3), webhooks (the trigger's own entry point) and AMQP
(RabbitMQ).

A :class:`Source` says how to start its trigger, put objects in (S3 event notifications, or the objects themselves
for polling), and make it die between publish and acknowledgement. :class:`TriggerContract` holds the tests; one
subclass per source runs them. Every message here is an object event for the ``echo`` function, so every source
reads the same input, and ``.jpg`` keys under ``in/`` are the ones the triggers want.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from typing import Any, ClassVar

import orjson
import pytest

from gpufleet import trace
from gpufleet.dev.objectstores import S3Service
from gpufleet.errors import RequestError
from gpufleet.triggers import backend
from gpufleet.triggers.base import SourceTrigger
from tests.harness import FleetHarness
from tests.integration.test_object_push import aws_record, s3_test_event
from tests.s3util import s3_client, sqs_client

WANTED = {"function": "echo", "prefix": "in/", "suffix": ".jpg"}
DOWN = "redis://127.0.0.1:1/0"  # nothing listens there: every publish fails until the trigger is stopped


class Running:
    """A trigger at work: its ``run`` in a thread (a webhook has none: its sender calls it)."""

    def __init__(self, trigger: SourceTrigger[Any]) -> None:
        self.trigger, self.stop_event = trigger, threading.Event()
        self.error: BaseException | None = None
        self.thread: threading.Thread | None = None
        if hasattr(trigger, "run"):
            self.thread = threading.Thread(target=self._run, daemon=True)
            self.thread.start()

    def _run(self) -> None:
        try:
            self.trigger.run(self.stop_event)  # type: ignore[attr-defined]
        except Exception as exc:  # noqa: BLE001 - a test's crash kills the thread as a process would die
            self.error = exc

    @property
    def stats(self) -> dict[str, int]:
        return self.trigger.stats

    def stop(self) -> None:
        self.stop_event.set()
        if self.thread is not None:
            self.thread.join(30)
            assert not self.thread.is_alive()
        else:
            self.trigger.close()


class Source:
    """One kind of source under the contract."""

    malformed_reason = "malformed_json"
    redelivery_s = 0.0  # how long an unacknowledged message takes to come back (SQS: its visibility timeout)

    def __init__(self, harness: FleetHarness) -> None:
        self.harness = harness
        self.bucket = f"b-{harness.prefix.lower()}"
        self.running: Running | None = None

    def trigger_file(self) -> dict[str, Any]:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        return {}

    def start(self, redis_down: bool = False) -> Running:
        h = self.harness
        extra = self.config() | ({"redis": {"url": DOWN}} if redis_down else {})
        h.write_config(triggers={"src": self.trigger_file()}, **extra)
        fleet = h.fleet()
        self.running = Running(backend(fleet.triggers["src"].scheme)(fleet, fleet.triggers["src"]))
        return self.running

    def notify(self, *bodies: bytes) -> None:
        """Deliver messages to the source."""
        raise NotImplementedError

    def put(self, keys: list[str]) -> None:
        """New objects: one notification each."""
        self.notify(*(orjson.dumps({"Records": [aws_record(self.bucket, k, "image/jpeg")]}) for k in keys))

    def put_malformed(self) -> None:
        self.notify(b"{not json")

    def notify_traced(self, body: bytes, traceparent: str) -> bool:
        """Deliver a message with a W3C ``traceparent`` header; False for a source whose messages have no headers
        (SQS notifications, bucket listings)."""
        return False

    def put_test_event(self) -> None:
        self.notify(orjson.dumps(s3_test_event(self.bucket)))

    def crash_between_publish_and_ack(self, running: Running) -> threading.Event:
        """Make the trigger die after its next publish, before it acknowledges; set the event when it has."""
        crashed = threading.Event()
        trigger: Any = running.trigger

        def crash(batch: Any) -> None:
            self.lose_connection(trigger)
            crashed.set()
            raise ConnectionError("killed between publish and ack")

        trigger.ack = crash
        return crashed

    def lose_connection(self, trigger: Any) -> None:
        pass

    def close(self) -> None:
        pass


class KafkaSource(Source):
    def trigger_file(self) -> dict[str, Any]:
        return {"source": f"kafka:///{self.harness.topic('contract')}", "format": "s3", **WANTED}

    def notify(self, *bodies: bytes) -> None:
        self.harness.produce("contract", list(bodies))

    def notify_traced(self, body: bytes, traceparent: str) -> bool:
        self.harness.produce("contract", [body], headers=[("traceparent", traceparent.encode())])
        return True

    def crash_between_publish_and_ack(self, running: Running) -> threading.Event:
        crashed = threading.Event()
        trigger: Any = running.trigger

        def commit(consumer: Any, offsets: Any) -> None:  # the batch is durable in Redis...
            crashed.set()
            raise RuntimeError("killed before the offsets were committed")  # ...and the process dies

        trigger._commit = commit
        return crashed


class AmqpSource(Source):
    def __init__(self, harness: FleetHarness, url: str) -> None:
        import amqp

        super().__init__(harness)
        self.url, self.queue = url, f"q-{uuid.uuid4().hex[:10]}"
        self.conn = amqp.Connection(url.split("@", 1)[1].rstrip("/"), userid="guest", password="guest")
        self.conn.connect()
        self.channel = self.conn.channel()
        self.channel.queue_declare(self.queue, durable=True, auto_delete=False)

    def trigger_file(self) -> dict[str, Any]:
        return {"source": f"{self.url}?queue={self.queue}", "format": "s3", **WANTED}

    def notify(self, *bodies: bytes) -> None:
        import amqp

        for body in bodies:
            self.channel.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=self.queue)

    def notify_traced(self, body: bytes, traceparent: str) -> bool:
        import amqp

        message = amqp.Message(body, delivery_mode=2, application_headers={"traceparent": traceparent})
        self.channel.basic_publish(message, routing_key=self.queue)
        return True

    def lose_connection(self, trigger: Any) -> None:
        trigger._conn.collect()  # the socket goes without a word, as when the process is killed

    def close(self) -> None:
        self.conn.close()


class SqsSource(Source):
    redelivery_s = 5.0

    def __init__(self, harness: FleetHarness, moto: S3Service) -> None:
        super().__init__(harness)
        self.moto, self.queue = moto, f"q-{harness.prefix}"
        self.sqs = sqs_client(moto.url)
        self.queue_url = self.sqs.create_queue(QueueName=self.queue)["QueueUrl"]

    def trigger_file(self) -> dict[str, Any]:
        return {"source": f"sqs:///{self.queue}", "visibility_timeout_s": 5, "wait_time_s": 1, **WANTED}

    def config(self) -> dict[str, Any]:
        m = self.moto
        return {"s3": {"endpoint_url": m.url, "sqs_endpoint_url": m.url, "access_key_id": m.access_key,
                       "secret_access_key": m.secret_key}}  # fmt: skip

    def notify(self, *bodies: bytes) -> None:
        for body in bodies:
            self.sqs.send_message(QueueUrl=self.queue_url, MessageBody=body.decode(errors="replace"))


class PollSource(Source):
    """Polling lists a bucket: its input is objects, and what it cannot take is an oversize event (a long key)."""

    malformed_reason = "oversize"
    MAX_EVENT = 700

    def __init__(self, harness: FleetHarness, moto: S3Service) -> None:
        super().__init__(harness)
        self.moto, self.s3 = moto, s3_client(moto.url)
        self.s3.create_bucket(Bucket=self.bucket)

    def trigger_file(self) -> dict[str, Any]:
        return {"source": f"s3://{self.bucket}/in/", "poll_interval_s": 0.3, "max_payload_bytes": self.MAX_EVENT,
                **WANTED}  # fmt: skip

    def config(self) -> dict[str, Any]:
        m = self.moto
        return {"s3": {"endpoint_url": m.url, "access_key_id": m.access_key, "secret_access_key": m.secret_key}}

    def put(self, keys: list[str]) -> None:
        for key in keys:
            self.s3.put_object(Bucket=self.bucket, Key=key, Body=key.encode())

    def put_malformed(self) -> None:
        self.put(["in/" + "x" * self.MAX_EVENT + ".jpg"])

    def put_test_event(self) -> None:
        pass  # a listing has none

    def crash_between_publish_and_ack(self, running: Running) -> threading.Event:
        """The process dies before it writes the checkpoint (its acknowledgement), after the publish."""
        crashed = threading.Event()

        def die(*args: Any, **kwargs: Any) -> Any:
            crashed.set()
            raise RuntimeError("killed before the checkpoint was written")

        running.trigger.redis.hset = die  # type: ignore[attr-defined]
        return crashed


class WebhookSource(Source):
    """The webhook's entry point, called as the api role calls it; its acknowledgement is the 200."""

    TOKEN = "wY4kZmux8AOPuP-P_JLb8J0cDoaegQzzbtDp6DANkig"

    def trigger_file(self) -> dict[str, Any]:
        return {"source": "webhook:///contract", "token": self.TOKEN, **WANTED}

    def config(self) -> dict[str, Any]:
        return {"api": {"enabled": True, "token": "Z5JiSDMvqzdouHu8q4SPqltrFOEYiYzSNdeIHFGVoNM"}}

    def notify(self, *bodies: bytes) -> None:
        assert self.running is not None
        for body in bodies:
            # A 503, or no answer: the sender keeps the body and sends it again later (see resend).
            with contextlib.suppress(RequestError, ConnectionError):
                self.running.trigger.receive(body)  # type: ignore[attr-defined]

    def notify_traced(self, body: bytes, traceparent: str) -> bool:
        assert self.running is not None
        self.running.trigger.receive(body, traceparent)  # type: ignore[attr-defined]
        return True

    def crash_between_publish_and_ack(self, running: Running) -> threading.Event:
        """The 200 is lost on its way back: the sender sends the same bodies again."""
        crashed = threading.Event()
        trigger: Any = running.trigger
        receive = trigger.receive

        def answer_lost(body: bytes) -> Any:
            receive(body)
            crashed.set()
            raise ConnectionError("the answer was lost")

        trigger.receive = answer_lost
        return crashed


class TriggerContract:
    """The tests every source passes. A subclass provides the ``source`` fixture."""

    RESEND: ClassVar[bool] = False  # the sender, not the source, delivers again (webhooks)

    def tasks(self, source: Source) -> int:
        return sum(source.harness.registry.counts("echo").values())

    def resend(self, source: Source, keys: list[str]) -> None:
        """What a sender does for messages it has no acknowledgement for (webhooks only; a queue redelivers)."""
        if self.RESEND:
            source.put(keys)

    def test_each_message_is_published_once_then_acknowledged(self, source: Source) -> None:
        keys = [f"in/k{i}.jpg" for i in range(12)]
        running = source.start()
        try:
            source.put(keys)
            source.harness.wait_for(lambda: running.stats["published"] == 12, what="12 tasks")
            time.sleep(max(1.0, source.redelivery_s + 1))  # anything unacknowledged would be back by now
        finally:
            running.stop()
        assert running.stats["duplicates"] == 0 and self.tasks(source) == 12

    def test_malformed_input_is_dead_lettered_and_intake_goes_on(self, source: Source) -> None:
        running = source.start()
        try:
            source.put_malformed()
            source.put(["in/after.jpg"])
            h = source.harness
            h.wait_for(lambda: running.stats["published"] == 1, what="the good message's task")
            [letter] = h.records("dlq", 1)
            assert letter["headers"]["reason"] == source.malformed_reason and letter["headers"]["trigger"] == "src"
        finally:
            running.stop()
        assert running.stats["dead_lettered"] == 1

    def test_a_kill_between_publish_and_ack_loses_nothing(self, source: Source) -> None:
        """What the dying trigger published comes back (redelivered, re-read, re-listed or re-sent) and is
        suppressed as duplicates; what it never took is published by the next one."""
        keys = [f"in/k{i}.jpg" for i in range(8)]
        dying = source.start()
        crashed = source.crash_between_publish_and_ack(dying)
        source.put(keys)
        source.harness.wait_for(crashed.is_set, what="the crash")
        dying.stop()
        before = dying.stats["published"]
        assert before >= 1 and self.tasks(source) == before
        again = source.start()
        try:
            self.resend(source, keys)
            source.harness.wait_for(lambda: self.tasks(source) == 8 and again.stats["duplicates"] == before,
                                    what=f"8 tasks and {before} duplicates")  # fmt: skip
        finally:
            again.stop()
        assert again.stats["published"] == 8 - before

    def test_a_task_joins_the_trace_its_message_names_or_starts_one(self, source: Source) -> None:
        caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
        running = source.start()
        try:
            source.put(["in/untraced.jpg"])
            traced = source.notify_traced(orjson.dumps({"Records": [aws_record(source.bucket, "in/traced.jpg",
                                                                               "image/jpeg")]}), caller)  # fmt: skip
            source.harness.wait_for(lambda: running.stats["published"] == 1 + traced, what="the tasks")
        finally:
            running.stop()
        registry = source.harness.registry
        parents = {}
        for _, task_id in registry.list_ids("echo", "QUEUED", None, 10):
            record = registry.get(task_id, event=True) or {}
            parents[record["event"]["key"]] = trace.parse(record["meta"]["traceparent"])
        fresh = parents["in/untraced.jpg"]
        assert fresh is not None and fresh[0] != caller.split("-")[1] and fresh[2] == "01"
        if traced:  # the caller's trace, a span of the task's own, the caller's flags
            assert parents["in/traced.jpg"] is not None
            trace_id, span_id, flags = parents["in/traced.jpg"]
            assert (trace_id, flags) == ("4bf92f3577b34da6a3ce929d0e0e4736", "01") and span_id != "00f067aa0ba902b7"

    def test_a_stop_while_publishing_acknowledges_nothing(self, source: Source) -> None:
        keys = [f"in/k{i}.jpg" for i in range(5)]
        stuck = source.start(redis_down=True)
        source.put(keys)
        time.sleep(3)  # received, and retrying the publish
        stuck.stop()
        assert stuck.stats["published"] == 0
        time.sleep(source.redelivery_s)
        fresh = source.start()
        try:
            self.resend(source, keys)
            source.harness.wait_for(lambda: fresh.stats["published"] == 5, what="all five, from the next trigger")
        finally:
            fresh.stop()

    def test_filtered_messages_and_test_events_are_acknowledged_without_a_dead_letter(self, source: Source) -> None:
        running = source.start()
        try:
            source.put_test_event()
            source.put(["in/notes.txt", "elsewhere/cat.jpg", "in/cat.jpg"])
            source.harness.wait_for(lambda: running.stats["published"] == 1, what="the .jpg task")
            time.sleep(max(1.0, source.redelivery_s + 1))
        finally:
            running.stop()
        assert running.stats["dead_lettered"] == 0 and running.stats["published"] == 1
        assert running.stats["ignored"] >= 1 and self.tasks(source) == 1


class TestKafka(TriggerContract):
    @pytest.fixture
    def source(self, harness: FleetHarness) -> Source:
        return KafkaSource(harness)


class TestSqs(TriggerContract):
    @pytest.fixture
    def source(self, harness: FleetHarness, moto: S3Service) -> Source:
        return SqsSource(harness, moto)


class TestPoll(TriggerContract):
    @pytest.fixture
    def source(self, harness: FleetHarness, moto: S3Service) -> Source:
        return PollSource(harness, moto)


class TestWebhook(TriggerContract):
    RESEND = True

    @pytest.fixture
    def source(self, harness: FleetHarness, monkeypatch: pytest.MonkeyPatch) -> Source:
        monkeypatch.setattr("gpufleet.triggers.webhook.PUBLISH_TIMEOUT_S", 1.0)
        return WebhookSource(harness)


@pytest.mark.xdist_group("rabbitmq")  # the session's RabbitMQ: one per xdist worker that asks, 7 s of CPU each
class TestAmqp(TriggerContract):
    @pytest.fixture
    def source(self, harness: FleetHarness, rabbitmq: str) -> Iterator[Source]:
        made = AmqpSource(harness, rabbitmq)
        yield made
        made.close()
