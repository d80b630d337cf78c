"""Kafka destination.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092,host2:9092/topic``.

Guarantees: a batch is acknowledged by the brokers (``acks=all``) before :meth:`deliver` returns. A record Kafka
refuses for good (larger than ``max_request_size`` or the broker's ``message.max.bytes``, an invalid topic, a topic
this client may not write) is returned as a :class:`Refusal`; any other failure raises :class:`DeliveryError` and
the caller retries the batch. The message key is the task id, so a consumer can
de-duplicate, and records of one task keep their order within a partition.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from gpufleet.destinations.base import OutRecord, Refusal
from gpufleet.errors import DeliveryError
from gpufleet.settings import KafkaSettings
from gpufleet.urls import Endpoint


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


class KafkaDestination:
    def __init__(self, endpoint: Endpoint, settings: KafkaSettings, producer: Any | None = None) -> None:
        self.topic = endpoint.path
        self._bootstrap = endpoint.hosts or settings.bootstrap_servers
        self._settings = settings
        self._producer = producer
        self._owns_producer = producer is None
        self._lock = threading.Lock()  # webhook requests deliver from several threads: one producer for all

    def _client(self) -> Any:
        with self._lock:
            if self._producer is None:
                self._producer = kafka_producer(self._bootstrap, self._settings)
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
            if self._producer is not None and self._owns_producer:
                self._producer.close(timeout=5)
                self._producer = None


@functools.cache
def _refusals() -> tuple[type[Exception], ...]:
    """kafka-python's errors that no retry can cure; every other error is transient (kombu's ``connection_errors``
    idea, turned around)."""
    from kafka import errors

    return (errors.MessageSizeTooLargeError, errors.RecordListTooLargeError, errors.InvalidTopicError,
            errors.TopicAuthorizationFailedError, errors.InvalidRecordError)  # fmt: skip
