"""Kafka destination.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092,host2:9092/topic``.

Guarantees: a batch is acknowledged by the brokers (``acks=all``) before :meth:`deliver` returns; any failure raises
:class:`DeliveryError` and the caller retries the batch. The message key is the task id, so a consumer can
de-duplicate, and records of one task keep their order within a partition.
"""

from __future__ import annotations

import threading
from typing import Any

from gpufleet.destinations.base import OutRecord
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

    def deliver(self, records: list[OutRecord]) -> None:
        producer = self._client()
        try:
            futures = [
                producer.send(
                    self.topic,
                    key=r.key.encode(),
                    value=r.value,
                    headers=[(k, v.encode()) for k, v in r.headers.items()],
                )
                for r in records
            ]
            producer.flush(timeout=self._settings.request_timeout_ms / 1000)
            for future in futures:
                future.get(timeout=0)
        except Exception as exc:  # kafka-python raises many types; all mean "not delivered"
            raise DeliveryError(f"Kafka topic {self.topic!r}: {type(exc).__name__}: {exc}") from exc

    def close(self) -> None:
        with self._lock:
            if self._producer is not None and self._owns_producer:
                self._producer.close(timeout=5)
                self._producer = None
