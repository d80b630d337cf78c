"""What a trigger does with what it received (:class:`Ingest`): parse each message into tasks, publish them in
one atomic Redis call, dead-letter the rest with the reason, and say when the source may acknowledge.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, NamedTuple

import structlog

from gpufleet import trace
from gpufleet.aws import ObjectEvent
from gpufleet.credentials import redact_url
from gpufleet.delivery.letters import (
    DEFAULT_ID_HEADER,
    OBJECT_HEADER,
    SIGNATURE_HEADER,
    SUPPLIED_ID_HEADER,
    fleet_key,
    sign,
)
from gpufleet.delivery.parking import Parking
from gpufleet.destinations import open_destination
from gpufleet.destinations.base import Destination, OutRecord
from gpufleet.errors import BrokerError, EventError, unreachable_hint
from gpufleet.intake.ids import OBJECT_ORIGIN, SUPPLIED_ID_RE, trigger_origin, trigger_task_id
from gpufleet.intake.path import Intake, Producer, check_priority
from gpufleet.registry.messages import MAX_PRIORITY
from gpufleet.registry.model import REDIS_ERRORS, Enqueued, NewTask
from gpufleet.registry.snapshot import record_dead_letters, report_lag
from gpufleet.registry.store import Registry
from gpufleet.retry import retry_until
from gpufleet.scheduling.aliases import Aliases
from gpufleet.scheduling.placement import Placer
from gpufleet.scheduling.versions import ServedVersions
from gpufleet.triggers.options import ObjectEvents, TriggerSettings
from gpufleet.triggers.s3events import EventFilter, parse_notification

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger")
# Headers a dead letter carries so that `gpufleet redrive` rebuilds the message as the trigger first saw it, with the
# same identity (see gpufleet.delivery.readback).
MAX_SOURCE_CHARS = 512  # a dead letter's key and source header: what a sender controls (an SNS MessageId) is cut

NO_HEADERS: Mapping[str, bytes] = MappingProxyType({})


# A tuple: made per message on a trigger's hot path, 4x cheaper than a frozen dataclass.
class SourceMessage(NamedTuple):
    value: bytes
    source_id: str  # where it came from, e.g. "kafka:topic/partition/offset"
    default_id: str  # the task id when the producer supplies none
    headers: Mapping[str, bytes] = NO_HEADERS
    timestamp: float | None = None
    # Object events that came without a notification (a bucket listing); ``value`` is then their JSON, which a dead
    # letter quotes.
    objects: tuple[ObjectEvent, ...] | None = None
    priority: int | None = None  # the transport's own priority (AMQP), when the message has one
    problem: tuple[str, str] | None = None  # (reason, detail): the transport could not read it (AMQP properties)


@dataclass
class Prepared:
    """A parsed batch: tasks to publish and dead letters to deliver."""

    tasks: list[NewTask]
    dead: list[OutRecord]
    ignored: int = 0  # messages that asked for nothing: an s3:TestEvent, or only events the filters drop
    sources: list[SourceMessage] = field(default_factory=list)  # the message each task came from


Sent = Callable[[], list[Enqueued]]  # a batch on its way to Redis: the call reads the answers (see Ingest.send)


@dataclass
class BatchResult:
    published: int = 0
    duplicates: int = 0
    dead_lettered: int = 0
    ignored: int = 0


class Ingest:
    """Parsing, publishing and dead-lettering for one trigger."""

    def __init__(self, fleet: Fleet, trigger: TriggerSettings, registry: Registry | None = None) -> None:
        self.fleet = fleet
        self.trigger = trigger
        s = fleet.settings
        self.registry = registry or Registry.for_fleet(s)
        self.origin = trigger_origin(trigger.name)
        self.intake = Intake(
            fleet,
            Producer(
                trigger.name,
                self.origin,
                trigger.max_payload_bytes or s.defaults.max_payload_bytes,
                trigger.on_success,
                trigger.on_failure,
            ),
            Placer(self.registry, fleet.functions.values(), fleet.settings.worker.reserve_after_s),
            Aliases(self.registry, s.aliases),
            ServedVersions(self.registry, s.defaults.retention_s),
        )
        self.max_record_bytes = s.defaults.max_record_bytes
        self.dead_letter_url = trigger.dead_letter or s.defaults.dead_letter
        self.dead_letter: Destination = open_destination(self.dead_letter_url, s)
        self.parking = Parking(self.registry.client, s.redis.key_prefix)
        self._letter_key: bytes | None = None  # the fleet's dead-letter key (gpufleet.delivery.letters), read once
        self.redis_hint = unreachable_hint("Redis", "redis.url", redact_url(s.redis.url))
        # What this trigger did so far, for its logs and for tests; updated by publish().
        self.stats = {"published": 0, "duplicates": 0, "dead_lettered": 0, "ignored": 0}
        self.objects: ObjectEvents | None = None  # the trigger's object-event keys, when it reads object events
        self.object_filter: EventFilter | None = None
        if isinstance(trigger, ObjectEvents):
            self.objects = trigger
            self.object_filter = EventFilter(trigger.events, trigger.prefix, trigger.suffix)

    def parse(self, msg: SourceMessage) -> list[NewTask]:
        """Turn one message into its tasks, or raise EventError with the dead-letter reason. An object
        notification may hold several records, or none that this trigger wants (a TestEvent, a filtered key)."""
        if msg.problem is not None:
            raise EventError(*msg.problem)
        intake = self.intake
        objects, wanted = self.objects, self.object_filter
        if objects is not None and wanted is not None:
            intake.check_size(len(msg.value))
            events = msg.objects
            if events is None:
                events = tuple(parse_notification(msg.value, objects.key_encoding, objects.max_records).events)
            return self.object_tasks([event for event in events if wanted.matches(event)], msg)
        body = intake.decode(msg.value)
        function, priority_field = self.trigger.function, self.trigger.priority_field
        if function is None:
            if not isinstance(body, dict) or not isinstance(body.get("function"), str) or "payload" not in body:
                expected = '{"function": NAME, "payload": ..., "id"?: ID, "priority"?: 0-9}'
                raise EventError("schema_mismatch", f"expected {expected}")
            function, payload, priority_field = body["function"], body["payload"], "priority"
        else:
            payload = body
        fn, version = intake.target(function)
        field = body.get(priority_field) if priority_field and isinstance(body, dict) else None
        priority = self._priority(msg, field)
        return [
            intake.task(
                fn,
                payload,
                self._task_id(msg, body),
                msg.source_id,
                event_ts=msg.timestamp,
                traceparent=msg.headers.get(trace.HEADER),
                priority=priority,
                version=version,
            )
        ]

    def object_tasks(self, events: list[ObjectEvent], msg: SourceMessage) -> list[NewTask]:
        """One task per object event, its id the object's identity; the function gets the event as a dict (or
        an ObjectEvent, if it declares ``payload=ObjectEvent``) and ``ctx.download()``/``ctx.upload()``."""
        fn = self.fleet.functions[self.trigger.function or ""]  # object triggers name their function (load checks)
        meta = {"kind": "object", "output": self.objects.output if self.objects else None}
        priority = self._priority(msg, None)
        return [
            self.intake.task(
                fn,
                event.model_dump(mode="json"),
                event.task_id(fn.name),
                msg.source_id,
                event_ts=msg.timestamp,
                meta=meta,
                origin=OBJECT_ORIGIN,
                traceparent=msg.headers.get(trace.HEADER),
                priority=priority,
            )
            for event in events
        ]

    def _priority(self, msg: SourceMessage, field: object) -> int:
        """The header, the field, the transport's own, then the trigger's. Raises EventError (``bad_priority``)."""
        header = self.trigger.priority_header
        if header and header in msg.headers:
            return check_priority(msg.headers[header])
        if field is not None:
            return check_priority(field)
        return self.trigger.priority if msg.priority is None else min(msg.priority, MAX_PRIORITY)

    def _task_id(self, msg: SourceMessage, body: Any) -> str:
        """``<trigger>:<the producer's id, or the message's default id>``: a producer names ids only in its own
        trigger's namespace (see :mod:`gpufleet.intake.ids`)."""
        supplied: Any = None
        if self.trigger.id_header and self.trigger.id_header in msg.headers:
            supplied = msg.headers[self.trigger.id_header].decode(errors="replace")
        elif self.trigger.id_field and isinstance(body, dict) and self.trigger.id_field in body:
            supplied = body[self.trigger.id_field]
        if supplied is None:
            return trigger_task_id(self.trigger.name, msg.default_id)
        if isinstance(supplied, int) and not isinstance(supplied, bool):
            supplied = str(supplied)
        if not isinstance(supplied, str) or not SUPPLIED_ID_RE.fullmatch(supplied):
            raise EventError("bad_id", f"id {supplied!r:.250} must match {SUPPLIED_ID_RE.pattern}")
        return trigger_task_id(self.trigger.name, supplied)

    def prepare(self, messages: list[SourceMessage]) -> Prepared:
        """Parse a batch (CPU only): a source can prepare the next batch while the last one is published."""
        batch = Prepared([], [])
        tasks, sources = batch.tasks, batch.sources
        for msg in messages:
            try:
                parsed = self.parse(msg)
            except EventError as exc:
                batch.dead.append(self.dead_record(msg, exc.reason, exc.detail))
                continue
            except Exception as exc:  # whatever one message does, intake goes on without it
                log.exception("unexpected error while turning a message into tasks", source=msg.source_id)
                batch.dead.append(self.dead_record(msg, "intake_error", f"{type(exc).__name__}: {exc}"))
                continue
            if len(parsed) == 1:  # most messages
                tasks.append(parsed[0])
                sources.append(msg)
            else:
                tasks += parsed
                sources += [msg] * len(parsed)
                batch.ignored += not parsed
        return batch

    def dead_record(self, msg: SourceMessage, reason: str, detail: str) -> OutRecord:
        """The dead letter for a message: its original bytes, the reason and where it came from. Bytes beyond
        ``max_record_bytes`` (only an ``oversize`` message has them) are cut, and the headers say so."""
        log.warning("dead-lettered", reason=reason, detail=detail[:300], source=msg.source_id[:300])
        source = msg.source_id[:MAX_SOURCE_CHARS]
        headers = {
            "reason": reason,
            "detail": detail[:2000],
            "source": source,
            "trigger": self.trigger.name,
            DEFAULT_ID_HEADER: msg.default_id[:MAX_SOURCE_CHARS],
        }
        supplied = msg.headers.get(self.trigger.id_header or "")
        if supplied is not None:
            headers[SUPPLIED_ID_HEADER] = supplied[:MAX_SOURCE_CHARS].decode(errors="replace")
        if msg.objects is not None:
            headers[OBJECT_HEADER] = "true"
        value = msg.value
        if len(value) > self.max_record_bytes:
            headers |= {
                "truncated": "true",
                "original_bytes": str(len(value)),
                "original_sha256": hashlib.sha256(value).hexdigest(),
            }
            value = value[: self.max_record_bytes]
        return OutRecord(key=source, value=value, headers=headers)

    def publish(self, batch: Prepared, stop: threading.Event) -> BatchResult | None:
        """Make a prepared batch durable; None if ``stop`` was set first (then nothing may be acknowledged). A task
        whose id exists for another function or origin is dead-lettered (``id_conflict``) with its message, and
        added to ``batch.dead``."""
        return self.complete(batch, self.send(batch), stop)

    def send(self, batch: Prepared) -> Sent | None:
        """The first half of :meth:`publish`: the batch's tasks go to Redis now (None if they could not), and
        :meth:`complete` reads the answers. A source parses its next batch in between, while Redis works."""
        try:
            return self.registry.send_enqueue(batch.tasks)
        except BrokerError as exc:
            log.warning("publish failed; retrying", error=str(exc), hint=self.redis_hint)
            return None

    def complete(self, batch: Prepared, sent: Sent | None, stop: threading.Event) -> BatchResult | None:
        """The second half of :meth:`publish`: the answers to :meth:`send`, or the whole batch again until Redis takes
        it (a task that got in before an error counts as a duplicate then)."""
        tasks = batch.tasks
        outcomes: list[Enqueued] = []
        if sent is not None:
            try:
                outcomes = sent()
            except BrokerError as exc:
                log.warning("publish failed; retrying", error=str(exc), hint=self.redis_hint)
        if tasks and not outcomes:
            enqueue = lambda: outcomes.extend(self.registry.enqueue_many(tasks))  # noqa: E731 - one line, retried
            if not retry_until(enqueue, stop, "publish", hint=self.redis_hint):
                return None
        dead = batch.dead
        conflicts: dict[int, tuple[SourceMessage, list[str]]] = {}  # one dead letter per message, naming its ids
        for task, source, outcome in zip(tasks, batch.sources, outcomes, strict=True):
            if outcome is Enqueued.CONFLICT:
                conflicts.setdefault(id(source), (source, []))[1].append(task.message.task_id)
        for source, ids in conflicts.values():
            dead.append(
                self.dead_record(
                    source, "id_conflict", f"task id(s) {', '.join(ids)} exist for another function or source"
                )
            )
        if dead and not retry_until(lambda: self._dead_letter(dead), stop, "dead-letter"):
            return None
        if dead:
            self._count_dead(dead)
        created = outcomes.count(Enqueued.CREATED)
        result = BatchResult(
            published=created,
            duplicates=outcomes.count(Enqueued.DUPLICATE),
            dead_lettered=len(dead),
            ignored=batch.ignored,
        )
        if result.duplicates:
            log.info("duplicates suppressed", count=result.duplicates)
        for key in self.stats:
            self.stats[key] += getattr(result, key)
        return result

    def _count_dead(self, dead: list[OutRecord]) -> None:
        try:
            record_dead_letters(self.registry, self.trigger.name, [d.headers for d in dead])
        except REDIS_ERRORS as exc:  # delivered already: a missed count must not deliver them again
            log.warning("cannot count dead letters in Redis", error=str(exc))

    def report_lag(self, kind: str, values: dict[str, int]) -> None:
        """The source's backlog, for ``gpufleet_trigger_lag_messages`` (see
        :func:`gpufleet.registry.snapshot.report_lag`)."""
        try:
            report_lag(self.registry, self.trigger.name, kind, values)
        except REDIS_ERRORS as exc:
            log.warning("cannot report trigger lag to Redis", error=str(exc))

    def _dead_letter(self, dead: list[OutRecord]) -> None:
        """Sign and deliver dead letters; park those the destination refuses for good, so the source can move on."""
        if self._letter_key is None:
            try:
                self._letter_key = fleet_key(self.registry.client, self.registry.prefix)
            except REDIS_ERRORS as exc:
                raise BrokerError(f"cannot read the fleet's dead-letter key from Redis: {exc}") from exc
        for record in dead:
            record.headers[SIGNATURE_HEADER] = sign(self._letter_key, record.value, record.headers)
        refused = self.dead_letter.deliver(dead)
        if refused:
            log.error(
                "dead-letter destination refused records for good; parked", count=len(refused), reason=refused[0].reason
            )
            try:
                self.parking.park_now(self.dead_letter_url, [(dead[r.index], r.reason) for r in refused])
            except REDIS_ERRORS as exc:
                raise BrokerError(f"cannot park refused dead letters in Redis: {exc}") from exc

    def close(self) -> None:
        self.dead_letter.close()
