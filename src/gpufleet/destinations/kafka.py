"""Kafka destination.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092,host2:9092/topic``. No options. Every
destination on one cluster shares one producer per process.

Guarantees: a batch is acknowledged by the brokers (``acks=all``) before :meth:`deliver` returns. A record Kafka
refuses for good (larger than ``max_request_size`` or the broker's ``message.max.bytes``, an invalid topic, a topic
this client may not write) is returned as a :class:`Refusal`; any other failure raises :class:`DeliveryError` and
the caller retries the batch. The message key is the task id, so a consumer can
de-duplicate, and records of one task keep their order within a partition.
"""

from __future__ import annotations

import functools
import threading
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.destinations.base import OutRecord, Refusal
from gpufleet.errors import DeliveryError
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

    return (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError, errors.InvalidTopicError,
            errors.TopicAuthorizationFailedError, errors.InvalidRecordError)  # fmt: skip
