"""AMQP 0-9-1 trigger (RabbitMQ): messages of a queue become tasks.

URL: ``amqp://user:password@host:5672/vhost?queue=gpufleet.requests`` (``amqps://`` for TLS; the vhost is
URL-encoded, ``%2F`` for ``/``, and an empty path is ``/``). Options: ``queue`` (required), ``password_env`` (the
environment variable that holds the password, instead of writing it in the URL), ``heartbeat_s`` (30; 0 for none).
The queue must exist: gpufleet
consumes it, it does not declare it. Messages are JSON events or routing envelopes, as on Kafka, or S3 event
notifications with ``format: s3`` (MinIO's AMQP target, Ceph's AMQP push endpoint).

Guarantees:
- Manual acknowledgement, only after every message of a batch is durably published (or dead-lettered). The
  prefetch window is ``batch_max`` messages, so the broker never hands one consumer more than one batch, and at most
  ``prefetch_bytes`` (64 MiB) over the payload limit: at most that many bytes wait in memory.
- No message ends the trigger, whatever its properties, headers or body (:mod:`gpufleet.triggers.amqp_frames`): one
  whose properties cannot be decoded is dead-lettered as ``bad_amqp_properties``, one over the payload limit as
  ``oversize`` (its first 4 KiB quoted, the rest never held in memory), and both are acknowledged.
- Its backlog (the queue's ready messages, and those this trigger holds unacknowledged) is in
  ``gpufleet_trigger_lag_messages``.
- A trigger that dies, or loses its connection, before acknowledging leaves its messages unacknowledged: RabbitMQ
  delivers them again and their tasks are suppressed as duplicates.
- Task id: ``<trigger>:<id>``, the id being the producer's (header ``gpufleet-id`` or field ``id``), else
  ``amqp-`` + a hash of the message's ``message_id`` property, else of its body. Two messages with the same body
  and no id are therefore one task: give each a ``message_id`` (or an id) if they are meant to run twice.
- A broker that goes away without closing the connection (its host down, a network partition) is noticed by the
  AMQP heartbeat within ``2 x heartbeat_s``, and the trigger reconnects with backoff; a broker restart closes the
  connection, and the same happens at once. While a publish waits for Redis no heartbeat is sent, so after two
  intervals RabbitMQ drops the connection and delivers the batch again: duplicates, suppressed, never a loss.
- RabbitMQ's ``consumer_timeout`` (30 minutes by default) closes a channel that holds a delivery unacknowledged for
  too long. It does not bite here: a message is acknowledged once its task is in Redis, within seconds, never
  after the GPU work.
"""

from __future__ import annotations

import contextlib
import hashlib
import threading
from datetime import datetime
from typing import TYPE_CHECKING, Any

import structlog
from pydantic import Field

from gpufleet.triggers.amqp_frames import frame_handler
from gpufleet.triggers.base import BatchTrigger, Received
from gpufleet.triggers.ingest import Ingest, SourceMessage
from gpufleet.triggers.options import TriggerSettings
from gpufleet.urls import EnvName, Options, amqp_login

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger.amqp")
FIRST_WAIT_S = 1.0  # for the first message of a batch; then messages already on their way are taken
MAX_PREFETCH = 65_535  # basic.qos prefetch_count is a short
MAX_TIMESTAMP = 253_402_300_800  # 10000-01-01: a message's timestamp property beyond it is read as none
# A read or write stalled this long means the link is gone: without it, closing a connection that heartbeats found
# dead would wait for the broker's close-ok for ever.
IO_TIMEOUT_S = 10.0


class AmqpOptions(Options):
    queue: str = Field(min_length=1, max_length=255)  # AMQP's shortstr
    password_env: EnvName | None = None
    # AMQP heartbeats, both ways: a broker that vanished without closing the connection (a host down, a partition)
    # is noticed within two intervals, and the trigger reconnects. 0 turns them off.
    heartbeat_s: int = Field(30, ge=0, le=3600)
    # What the prefetch window may hold: the prefetch count is lowered to this over the payload limit.
    prefetch_bytes: int = Field(64 * 2**20, ge=1)


class AmqpTrigger(BatchTrigger[TriggerSettings]):
    OPTIONS = AmqpOptions

    def __init__(self, fleet: Fleet, trigger: TriggerSettings, ingest: Ingest | None = None) -> None:
        super().__init__(fleet, trigger, ingest)
        from amqp.exceptions import AMQPError

        self.source_errors = (AMQPError,)
        options = AmqpOptions.model_validate(self.endpoint.options)  # parse_source checked them
        self.queue = options.queue
        self._login = amqp_login(trigger.source, options.password_env)
        self._heartbeat_s = options.heartbeat_s
        self._limit = trigger.max_payload_bytes or fleet.settings.defaults.max_payload_bytes
        self._prefetch = max(1, min(trigger.batch_max, MAX_PREFETCH, options.prefetch_bytes // self._limit))
        self._unacked = 0
        self._conn: Any = None
        self._channel: Any = None
        self._stats: Any = None
        self._pending: list[Any] = []

    def connect(self) -> None:
        conn = self._open(heartbeat=self._heartbeat_s, frame_handler=frame_handler(self._limit))
        channel = conn.channel()
        channel.basic_qos(0, self._prefetch, False)
        channel.basic_consume(self.queue, callback=self._on_message, no_ack=False)
        self._conn, self._channel = conn, channel
        log.info("amqp trigger consuming", trigger=self.name, queue=self.queue)

    def _open(self, **options: Any) -> Any:
        import amqp

        conn = amqp.Connection(
            connect_timeout=IO_TIMEOUT_S,
            read_timeout=IO_TIMEOUT_S,
            write_timeout=IO_TIMEOUT_S,
            **options,
            **self._login,
        )
        conn.connect()
        return conn

    def _on_message(self, message: Any) -> None:
        self._pending.append(message)

    def receive(self, stop: threading.Event) -> Received | None:
        wait = FIRST_WAIT_S
        while len(self._pending) < self._prefetch and not stop.is_set():
            self._conn.heartbeat_tick()  # sends ours when due; ConnectionForced when the broker's stopped coming
            try:
                self._conn.drain_events(timeout=wait)
            except TimeoutError:
                break  # nothing more right now
            wait = 0.01
        if not self._pending:
            return None
        messages, self._pending = self._pending, []
        self._unacked = len(messages)
        return Received([self._source_message(m) for m in messages], token=messages[-1].delivery_tag)

    def _source_message(self, message: Any) -> SourceMessage:
        body = message.body if isinstance(message.body, bytes) else str(message.body).encode()
        source_id = f"amqp:{self.queue}/{message.delivery_tag}"
        problem = getattr(message, "problem", None)
        if problem is None:
            try:
                return self._decoded(message, body, source_id)
            except Exception as exc:  # noqa: BLE001 - a property we cannot read refuses this message only
                problem = ("bad_amqp_properties", f"{type(exc).__name__}: {str(exc)[:300]}")
        default_id = f"amqp-{hashlib.sha256(body).hexdigest()[:32]}"
        return SourceMessage(value=body, source_id=source_id, default_id=default_id, problem=problem)

    def _decoded(self, message: Any, body: bytes, source_id: str) -> SourceMessage:
        props = message.properties
        identity = props.get("message_id")
        digest = hashlib.sha256(identity.encode() if isinstance(identity, str) and identity else body).hexdigest()
        headers = {
            str(k): v if isinstance(v, bytes) else str(v).encode()
            for k, v in (props.get("application_headers") or {}).items()
        }
        stamp = props.get("timestamp")
        timestamp = stamp.timestamp() if isinstance(stamp, datetime) else float(stamp) if stamp else None
        if timestamp is not None and not 0 < timestamp < MAX_TIMESTAMP:
            timestamp = None  # out of any calendar: the message is taken, as one without a timestamp
        priority = props.get("priority")
        return SourceMessage(
            value=body,
            source_id=source_id,
            default_id=f"amqp-{digest[:32]}",
            headers=headers,
            timestamp=timestamp,
            priority=priority if isinstance(priority, int) else None,
        )

    def ack(self, batch: Received) -> None:
        # Every delivery up to the batch's last, at once: the prefetch window never holds another batch's.
        self._channel.basic_ack(batch.token, multiple=True)
        self._unacked = 0

    def lag(self) -> tuple[str, dict[str, int]] | None:
        """The queue's ready messages (a passive declare), and those this trigger holds unacknowledged."""
        if self._stats is None:  # a connection of its own: the consuming one never waits on an RPC
            self._stats = self._open()
        try:
            _, ready, _ = self._stats.channel(1).queue_declare(self.queue, passive=True)
        except Exception:
            stats, self._stats = self._stats, None  # opened again next time
            with contextlib.suppress(Exception):
                stats.collect()
            raise
        return "depth", {"ready": int(ready), "unacked": self._unacked + len(self._pending)}

    def disconnect(self) -> None:
        conn, self._conn, self._channel, self._pending = self._conn, None, None, []
        stats, self._stats = self._stats, None
        if stats is not None:
            with contextlib.suppress(Exception):
                stats.collect()
        if conn is not None:
            try:
                conn.close()  # what was not acknowledged goes back to the queue
            except Exception:  # noqa: BLE001 - a broken connection: drop it
                conn.collect()
