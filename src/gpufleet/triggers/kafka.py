"""Kafka trigger.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092/topic``. Options in the trigger file:
``group`` (default ``gpufleet-<trigger name>``), ``batch_max``, ``id_header`` / ``id_field``.

Guarantees:
- Consumer group with manual commit: an offset is committed only after every message before it was published to
  the task queue (or delivered to the dead-letter topic). A crash between publish and commit re-reads messages;
  their task ids already exist, so they are suppressed as duplicates.
- Task id: the producer's id (header ``gpufleet-id`` or field ``id``) or ``kafka-<topic>-<partition>-<offset>``.
- Graceful stop: the batch in hand is finished and committed, then the consumer leaves its group.
"""

from __future__ import annotations

import threading
from typing import Any

import structlog

from gpufleet.settings import Fleet, TriggerSettings
from gpufleet.triggers import parse_source
from gpufleet.triggers.base import Ingest, SourceMessage

log = structlog.get_logger("gpufleet.trigger.kafka")


class KafkaTrigger:
    def __init__(self, fleet: Fleet, trigger: TriggerSettings, ingest: Ingest | None = None) -> None:
        self.name = trigger.name
        self.fleet = fleet
        self.trigger = trigger
        endpoint = parse_source(trigger.source)
        self.topic = endpoint.path
        self.bootstrap = endpoint.hosts or fleet.settings.kafka.bootstrap_servers
        self.group = trigger.group or f"gpufleet-{trigger.name}"
        self.ingest = ingest or Ingest(fleet, trigger)
        self.stats = {"published": 0, "duplicates": 0, "dead_lettered": 0}

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer

        k = self.fleet.settings.kafka
        return KafkaConsumer(
            self.topic,
            bootstrap_servers=self.bootstrap.split(","),
            client_id=f"{k.client_id}-trigger-{self.name}",
            group_id=self.group,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            max_poll_records=self.trigger.batch_max,
            session_timeout_ms=k.session_timeout_ms,
            heartbeat_interval_ms=k.heartbeat_interval_ms,
            fetch_max_wait_ms=k.fetch_max_wait_ms,
            request_timeout_ms=max(k.request_timeout_ms, k.session_timeout_ms + 5000),
        )

    def run(self, stop: threading.Event) -> None:
        from kafka.errors import CommitFailedError, KafkaError
        from kafka.structs import OffsetAndMetadata

        consumer = self._consumer()
        log.info("kafka trigger started", trigger=self.name, topic=self.topic, group=self.group)
        try:
            while not stop.is_set():
                polled = consumer.poll(timeout_ms=200, max_records=self.trigger.batch_max)
                if not polled:
                    continue
                messages = []
                offsets = {}
                for tp, records in polled.items():
                    for r in records:
                        messages.append(SourceMessage(
                            value=r.value or b"",
                            source_id=f"kafka:{r.topic}/{r.partition}/{r.offset}",
                            default_id=f"kafka-{r.topic}-{r.partition}-{r.offset}",
                            headers={k: v for k, v in (r.headers or []) if v is not None},
                            timestamp=r.timestamp / 1000 if r.timestamp and r.timestamp > 0 else None,
                        ))  # fmt: skip
                    offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
                result = self.ingest.handle(messages, stop)
                if result is None:
                    break  # stopping with work not durable: leave the offsets uncommitted, it is read again
                for key in self.stats:
                    self.stats[key] += getattr(result, key)
                try:
                    consumer.commit(offsets)
                except (CommitFailedError, KafkaError) as exc:
                    # A rebalance took the partitions: the next owner re-reads and finds duplicates, nothing is lost.
                    log.warning("offset commit failed; messages will be re-read and de-duplicated", error=str(exc))
        finally:
            consumer.close(autocommit=False)
            self.ingest.close()
            log.info("kafka trigger stopped", trigger=self.name, **self.stats)
