"""Kafka trigger.

URL: ``kafka:///topic`` (the fleet's Kafka) or ``kafka://host:9092/topic``. Options in the trigger file:
``group`` (default ``gpufleet-<trigger name>``), ``batch_max``, ``commit_interval_ms``, ``id_header`` /
``id_field``.

Guarantees:
- Consumer group with manual commit: an offset is committed only after every message before it was published to
  the task queue (or delivered to the dead-letter topic). A crash between publish and commit re-reads messages;
  their task ids already exist, so they are suppressed as duplicates. Commits come every ``commit_interval_ms``
  while messages keep coming, and at once when a poll finds none: a crash re-reads at most that much.
- Task id: ``<trigger>:<id>``, the id being the producer's (header ``gpufleet-id`` or field ``id``) or
  ``kafka-<topic>-<partition>-<offset>`` (see :mod:`gpufleet.intake.ids`).
- Graceful stop: the batch in hand is finished and committed, then the consumer leaves its group.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field

from gpufleet.errors import BrokerError, unreachable_hint
from gpufleet.triggers.base import LAG_EVERY_S, SourceTrigger
from gpufleet.triggers.ingest import NO_HEADERS, Ingest, Prepared, Sent, SourceMessage
from gpufleet.triggers.options import TriggerSettings

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger.kafka")
AHEAD = 2  # batches left in Redis's hands while the next is polled and parsed
METADATA_MAX_AGE_MS = 5000  # how soon a trigger sees a topic created after it started


class KafkaSettings(TriggerSettings):
    group: str | None = None  # the consumer group; default gpufleet-<trigger name>
    # Offsets of durable batches are committed at most this often while messages keep coming, and at once when the
    # partition runs dry. A crash re-reads what was not committed yet; intake de-duplicates it by task id.
    commit_interval_ms: int = Field(250, ge=0, le=60_000)


class KafkaTrigger(SourceTrigger[KafkaSettings]):
    """Its own loop, not :class:`BatchTrigger`'s: it publishes one batch while it polls and parses the next."""

    Settings = KafkaSettings

    def __init__(self, fleet: Fleet, trigger: KafkaSettings, ingest: Ingest | None = None) -> None:
        super().__init__(fleet, trigger, ingest)
        self.topic = self.endpoint.path
        self.bootstrap = self.endpoint.hosts or fleet.settings.kafka.bootstrap_servers
        self.group = trigger.group or f"gpufleet-{trigger.name}"

    def _consumer(self) -> Any:
        from kafka import KafkaConsumer
        from kafka.errors import KafkaConnectionError, KafkaTimeoutError

        k = self.fleet.settings.kafka
        try:
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
                # A topic created after the trigger joined its group (the first producer makes it) gets partitions
                # only when the consumer reads the metadata again: kafka-python's 5 minutes left such a trigger idle
                # that long ("No partition metadata for topic").
                metadata_max_age_ms=METADATA_MAX_AGE_MS,
            )
        except (KafkaTimeoutError, KafkaConnectionError) as exc:  # no broker answered: one line that says what to check
            hint = unreachable_hint("Kafka", "kafka.bootstrap_servers")
            raise BrokerError(f"cannot reach Kafka at {self.bootstrap}: {exc} ({hint})") from None

    def run(self, stop: threading.Event) -> None:
        try:
            consumer = self._consumer()
        except BaseException:
            self.close()
            raise
        # All on this thread: a batch is sent to Redis as soon as it is parsed, and read back AHEAD batches later, so
        # Redis runs scripts while Python polls and parses (a separate publish thread measured slower than none: the
        # GIL). An offset is committed only once its batch and every batch before it are durable: every
        # commit_interval_ms while messages keep coming (each commit is a round trip to the broker that stops this
        # thread), and as soon as a poll finds nothing new.
        inflight: deque[tuple[Prepared, Sent | None, dict[Any, Any]]] = deque()
        due: dict[Any, Any] = {}  # the offsets of durable batches, not committed yet
        log.info("kafka trigger started", trigger=self.name, topic=self.topic, group=self.group)
        next_lag = next_commit = 0.0
        interval = self.trigger.commit_interval_ms / 1000
        try:
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_lag:  # every LAG_EVERY_S; each second until a fetch has told us
                    next_lag = now + (LAG_EVERY_S if self._report_lag(consumer) else 1.0)
                polled = consumer.poll(timeout_ms=0 if inflight else 200, max_records=self.trigger.batch_max)
                if polled:
                    prepared, offsets = self._prepare(polled)
                    inflight.append((prepared, self.ingest.send(prepared), offsets))
                if not self._settle(inflight, due, AHEAD if polled else 0, stop):
                    break  # stopping with a batch not durable: its offsets stay uncommitted, it is read again
                if due and (not inflight or time.monotonic() >= next_commit):
                    self._commit(consumer, due)
                    due, next_commit = {}, time.monotonic() + interval
            self._settle(inflight, due, 0, stop)  # graceful stop: the batches in hand
            if due:
                self._commit(consumer, due)
        finally:
            consumer.close(autocommit=False)
            self.close()
            log.info("kafka trigger stopped", trigger=self.name, **self.stats)

    def _report_lag(self, consumer: Any) -> bool:
        """Consumer lag per assigned partition: the high watermark the last fetch saw, less the next offset to read.
        Both are known here once a fetch returned: no request to the broker (timeout 0)."""
        lag = {}
        try:
            for tp in consumer.assignment():
                high, position = consumer.highwater(tp), consumer.position(tp, timeout_ms=0)
                if high is not None and position is not None:
                    lag[str(tp.partition)] = max(0, high - position)
        except Exception as exc:  # noqa: BLE001 - a figure for metrics must never stop the trigger
            log.debug("cannot read the consumer lag", trigger=self.name, error=str(exc))
            return False
        if lag:
            self.ingest.report_lag("partition", lag)
        return bool(lag)

    def _prepare(self, polled: dict[Any, list[Any]]) -> tuple[Prepared, dict[Any, Any]]:
        from kafka.structs import OffsetAndMetadata

        messages = []
        offsets = {}
        for tp, records in polled.items():
            source, default = f"kafka:{tp.topic}/{tp.partition}/", f"kafka-{tp.topic}-{tp.partition}-"
            for r in records:
                ts = r.timestamp
                messages.append(
                    SourceMessage(  # positional: once per message (value, source_id, default_id, ...)
                        r.value or b"",
                        f"{source}{r.offset}",
                        f"{default}{r.offset}",
                        {k: v for k, v in r.headers if v is not None} if r.headers else NO_HEADERS,
                        ts / 1000 if ts and ts > 0 else None,
                    )
                )
            offsets[tp] = OffsetAndMetadata(records[-1].offset + 1, "", -1)
        return self.ingest.prepare(messages), offsets

    def _settle(
        self,
        inflight: deque[tuple[Prepared, Sent | None, dict[Any, Any]]],
        due: dict[Any, Any],
        keep: int,
        stop: threading.Event,
    ) -> bool:
        """Wait until all but the newest ``keep`` batches are durable, and add their offsets to ``due``. False if one
        was not (stopping): the batches after it are dropped, so no offset past it is ever committed."""
        while len(inflight) > keep:
            batch, sent, offsets = inflight.popleft()
            if self.ingest.complete(batch, sent, stop) is None:
                inflight.clear()
                return False
            due.update(offsets)
        return True

    def _commit(self, consumer: Any, offsets: dict[Any, Any]) -> None:
        from kafka.errors import CommitFailedError, KafkaError

        try:
            consumer.commit(offsets)
        except (CommitFailedError, KafkaError) as exc:
            # A rebalance took the partitions: the next owner re-reads and finds duplicates, nothing is lost.
            log.warning("offset commit failed; messages will be re-read and de-duplicated", error=str(exc))
