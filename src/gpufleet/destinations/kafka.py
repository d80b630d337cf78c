"""Kafka destination.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092,host2:9092/topic``. No options. Every
destination on one cluster shares one producer per process.

Guarantees: a batch is acknowledged by the brokers (``acks=all``) before :meth:`deliver` returns. A record Kafka
refuses for good (larger than ``max_request_size`` or the broker's ``message.max.bytes``, an invalid topic, a topic
this client may not write) is returned as a :class:`Refusal`; any other failure raises :class:`DeliveryError` and
the caller retries the batch. The message key is the task id, so a consumer can
de-duplicate, and records of one task keep their order within a partition.

Reading back (:class:`KafkaReader`, and :func:`read` for ``gpufleet redrive``): a topic keeps its records for every
reader, so reading them takes nothing from the consumers downstream. Partitions are assigned by hand, so a reader
never joins or rebalances anyone's group; only a redrive keeps offsets, in a group of its own.
"""

from __future__ import annotations

import functools
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.destinations.base import Landed, OutRecord, Refusal
from gpufleet.errors import BrokerError, DeliveryError, unreachable_hint
from gpufleet.urls import Endpoint, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings, KafkaSettings


def kafka_producer(bootstrap: str, settings: KafkaSettings, **overrides: Any) -> Any:
    """A KafkaProducer tuned for durable, batched delivery.

    Raises:
        DeliveryError: Kafka cannot be reached yet (retriable).
    """
    from kafka import KafkaProducer

    options: dict[str, Any] = {
        "bootstrap_servers": bootstrap.split(","),
        "client_id": settings.client_id,
        "acks": "all",
        "linger_ms": 2,
        "retries": 5,
        "request_timeout_ms": settings.request_timeout_ms,
        "max_block_ms": 10_000,
        "max_request_size": settings.max_request_size,
    }
    options.update(overrides)
    try:
        return KafkaProducer(**options)
    except Exception as exc:  # NoBrokersAvailable and friends all mean "Kafka is not up yet"
        raise DeliveryError(f"cannot connect to Kafka at {bootstrap}: {exc}") from exc


log = structlog.get_logger("gpufleet.destinations.kafka")


class _Producers:
    """One producer per cluster in a process, shared by every destination (topic) on it, closed with the last."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._held: dict[str, tuple[Any, int]] = {}  # bootstrap -> (producer, destinations using it)

    def acquire(self, bootstrap: str, settings: KafkaSettings) -> Any:
        with self._lock:
            producer, users = self._held.get(bootstrap) or (kafka_producer(bootstrap, settings), 0)
            self._held[bootstrap] = (producer, users + 1)
            return producer

    def release(self, bootstrap: str) -> None:
        with self._lock:
            producer, users = self._held[bootstrap]
            if users > 1:
                self._held[bootstrap] = (producer, users - 1)
                return
            del self._held[bootstrap]
        try:
            producer.close(timeout=5)
        except Exception as exc:  # noqa: BLE001 - records it could not flush were not acknowledged: sent again
            log.warning("kafka producer closed with records unsent", bootstrap=bootstrap, error=str(exc))


_PRODUCERS = _Producers()


class KafkaDestination:
    OPTIONS = Options

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self.topic = endpoint.path
        self._bootstrap = endpoint.hosts or settings.kafka.bootstrap_servers
        self._settings = settings.kafka
        self._producer: Any = None
        self._lock = threading.Lock()  # webhook requests deliver from several threads

    def _client(self) -> Any:
        with self._lock:
            if self._producer is None:
                self._producer = _PRODUCERS.acquire(self._bootstrap, self._settings)
            return self._producer

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        producer = self._client()
        refused: list[Refusal] = []
        refusals = _refusals()
        try:
            sent = []
            for i, r in enumerate(records):
                try:
                    headers = [(k, v.encode()) for k, v in r.headers.items()]
                    sent.append((i, producer.send(self.topic, key=r.key.encode(), value=r.value, headers=headers)))
                except refusals as exc:  # checked by the client before sending: too large for max_request_size
                    refused.append(Refusal(i, f"{type(exc).__name__}: {exc}"))
            producer.flush(timeout=self._settings.request_timeout_ms / 1000)
            for i, future in sent:
                try:
                    future.get(timeout=0)
                except refusals as exc:  # the broker's answer for this record
                    refused.append(Refusal(i, f"{type(exc).__name__}: {exc}"))
        except Exception as exc:  # kafka-python raises many types; all the others mean "not delivered yet"
            raise DeliveryError(f"Kafka topic {self.topic!r}: {type(exc).__name__}: {exc}") from exc
        return refused

    def close(self) -> None:
        with self._lock:
            if self._producer is not None:
                self._producer = None
                _PRODUCERS.release(self._bootstrap)


@functools.cache
def _refusals() -> tuple[type[Exception], ...]:
    """kafka-python's errors that no retry can cure; every other error is transient (kombu's ``connection_errors``
    idea, turned around)."""
    from kafka import errors

    return (
        errors.MessageSizeTooLargeError,
        errors.RecordListTooLargeError,
        errors.InvalidTopicError,
        errors.TopicAuthorizationFailedError,
        errors.InvalidRecordError,
    )


# -- reading back: gpufleet tail follows a topic, gpufleet redrive reads a trigger's dead letters ------------------

TOPIC_LOOK_S = 2.0  # how often a live reader looks for topics (or partitions) that did not exist yet
BOOTSTRAP_TIMEOUT_MS = 5000


@dataclass(frozen=True)
class KafkaRecord:
    topic: str
    partition: int
    offset: int
    timestamp: float
    key: str
    headers: dict[str, str]
    value: bytes


class KafkaReader:
    """A topic kept for every reader: reading it back takes nothing from the consumers downstream."""

    system = "Kafka"
    history = True

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self.settings = settings.kafka
        self.bootstrap = endpoint.hosts or settings.kafka.bootstrap_servers
        self.where = endpoint.path
        self._positions: dict[tuple[str, int], int] = {}  # where each partition goes on, after a reconnect
        self._started = False

    def follow(self, stop: threading.Event, from_beginning: bool, on_ready: Callable[[], None]) -> Iterator[Landed]:
        # After a reconnect, each partition goes on where it was; one not read from yet starts at its end.
        first, self._started = not self._started, True
        for r in read(
            self.settings,
            self.bootstrap,
            [self.where],
            stop,
            from_beginning=from_beginning and first,
            start_at=self._positions,
            on_ready=on_ready,
        ):
            self._positions[r.topic, r.partition] = r.offset + 1
            yield Landed(r.topic, f"{r.partition}/{r.offset}", r.timestamp, r.key, r.headers, r.value)

    def close(self) -> None:
        pass


def read(
    settings: KafkaSettings,
    bootstrap: str,
    topics: list[str],
    stop: threading.Event,
    *,
    from_beginning: bool = False,
    until_end: bool = False,
    poll_ms: int = 200,
    on_ready: Callable[[], None] | None = None,
    start_at: Mapping[tuple[str, int], int] | None = None,
) -> Iterator[KafkaRecord]:
    """Records of ``topics``: from the end (new ones only) or the beginning, or for a (topic, partition) in
    ``start_at`` from that offset; live until ``stop``, or with ``until_end`` only up to the end each partition had
    when reading began. ``on_ready`` is called once the starting positions are fixed: a record written after it is
    read. Partitions are assigned by hand: the reader never joins or rebalances anyone's group."""
    consumer = _consumer(settings, bootstrap)
    try:
        parts = _assign(consumer, topics, [], from_beginning)
        for tp in parts:
            if start_at and (tp.topic, tp.partition) in start_at:
                consumer.seek(tp, start_at[tp.topic, tp.partition])
                consumer.position(tp)
        # The end of each partition when reading began: the high watermark of its first fetch (ListOffsets is not
        # used: some Kafka-compatible brokers, tansu among them, answer it with the last offset, not the end).
        ends: dict[Any, int] = {}
        if on_ready is not None:
            on_ready()
        next_look = time.monotonic() + TOPIC_LOOK_S
        while not stop.is_set():
            if until_end:
                for tp in parts:
                    high = consumer.highwater(tp)
                    if tp not in ends and high is not None:
                        ends[tp] = high
                if len(ends) == len(parts) and all(consumer.position(tp) >= ends[tp] for tp in parts):
                    return
            if not until_end and time.monotonic() >= next_look:  # a topic (or partition) made since: all of it
                parts, next_look = _assign(consumer, topics, parts, True), time.monotonic() + TOPIC_LOOK_S
            if not parts:
                stop.wait(poll_ms / 1000)
                continue
            for tp, batch in consumer.poll(timeout_ms=poll_ms).items():
                for r in batch:
                    if until_end and r.offset >= ends.setdefault(tp, consumer.highwater(tp) or r.offset + 1):
                        continue
                    yield KafkaRecord(
                        r.topic,
                        r.partition,
                        r.offset,
                        r.timestamp / 1000,
                        r.key.decode(errors="replace") if r.key else "",
                        {k: v.decode(errors="replace") for k, v in r.headers or [] if v is not None},
                        r.value or b"",
                    )
    finally:
        consumer.close()


def _assign(consumer: Any, topics: list[str], assigned: list[Any], from_beginning: bool) -> list[Any]:
    """Assign every partition the topics have now; those not assigned before start at their beginning (or, on the
    first call without ``from_beginning``, at their end). Returns the partitions assigned."""
    from kafka import TopicPartition

    if assigned:
        consumer.topics()  # fetches fresh metadata: topics made since show up
    found = [
        TopicPartition(topic, p) for topic in sorted(topics) for p in sorted(consumer.partitions_for_topic(topic) or [])
    ]
    new = [tp for tp in found if tp not in assigned]
    if not new:
        return assigned
    positions = {tp: consumer.position(tp) for tp in assigned}
    consumer.assign(assigned + new)
    for tp, offset in positions.items():
        consumer.seek(tp, offset)
    if from_beginning:
        consumer.seek_to_beginning(*new)
    else:
        consumer.seek_to_end(*new)
    for tp in new:
        consumer.position(tp)  # resolves the seek now, not at the first poll: a record written after is read
    return assigned + new


def committed(settings: KafkaSettings, bootstrap: str, topic: str, group: str) -> dict[int, int]:
    """``group``'s committed offset for each partition of ``topic`` that has one."""
    from kafka import TopicPartition

    consumer = _consumer(settings, bootstrap, group)
    try:
        found = {}
        for p in consumer.partitions_for_topic(topic) or []:
            offset = consumer.committed(TopicPartition(topic, p))
            if offset is not None and offset >= 0:
                found[p] = offset
        return found
    finally:
        consumer.close()


def commit(settings: KafkaSettings, bootstrap: str, topic: str, group: str, offsets: Mapping[int, int]) -> None:
    """Commit ``group``'s offset for partitions of ``topic`` (partition -> the next offset to read). No metadata:
    some Kafka-compatible brokers (tansu) do not keep it."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = _consumer(settings, bootstrap, group)
    try:
        consumer.commit({TopicPartition(topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        consumer.close()


def _consumer(k: KafkaSettings, bootstrap: str, group: str | None = None) -> Any:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    try:
        # A person waits at the other end: an unreachable Kafka is said within BOOTSTRAP_TIMEOUT_MS, not 30 s
        # (kafka-python 3 has the setting; 2.x bootstraps within request_timeout_ms).
        quick = (
            {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
            if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG
            else {}
        )
        return KafkaConsumer(
            bootstrap_servers=bootstrap.split(","),
            client_id=f"{k.client_id}-readback",
            group_id=group,
            enable_auto_commit=False,
            request_timeout_ms=k.request_timeout_ms,
            auto_offset_reset="earliest",
            **quick,
        )
    except (KafkaTimeoutError, KafkaConnectionError) as exc:  # no broker answered
        hint = unreachable_hint("Kafka", "kafka.bootstrap_servers")
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc} ({hint})") from None
