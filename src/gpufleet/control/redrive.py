"""``gpufleet redrive``: a trigger's dead letters through its intake again, once the cause is fixed.

A redrive keeps each event's identity. A dead letter carries the source message's default id (and the producer's
id header, when the trigger reads one), so the event it re-sends gets the task id it would have got the first time;
a redrive that overlaps a source that delivered the message again runs nothing twice.

What a redrive has handled, it never reads again. It reads the dead-letter topic from where the trigger's last
redrive stopped up to the end the topic had when it began, and once what it sent is durable it moves that mark: the
offsets of the Kafka consumer group ``<key_prefix>.redrive.<trigger>``, or ``...<trigger>.<reason>`` for a redrive of
one reason (a later redrive of all of them skips what that one handled). A message refused again gets one new dead
letter, which the next redrive reads: one copy per redrive at most (before, each redrive read every copy again and
doubled them: 13, 26, 52, 104). A message with several dead letters in one read is sent once. A dry run lists the
letters it would send and moves nothing.

It trusts only this fleet's own letters (:mod:`gpufleet.delivery.letters`): one that is unsigned, or whose signature
does not match its bytes and headers (forged, or changed), is not sent, and the report names it, unless the operator
passes ``accept_unsigned`` (letters written before letters were signed). Its mark moves past it like any other, so run a
dry run first: it shows which letters are signed.
"""

from __future__ import annotations

import hashlib
import threading
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.delivery import letters
from gpufleet.destinations import parse_destination
from gpufleet.destinations.kafka import KafkaRecord, commit, committed, read
from gpufleet.errors import BrokerError, ConfigError, NotFoundError
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry

if TYPE_CHECKING:
    from gpufleet.config import Fleet
    from gpufleet.triggers.ingest import SourceMessage
    from gpufleet.triggers.options import TriggerSettings

log = structlog.get_logger("gpufleet.control.redrive")


@dataclass
class RedriveReport:
    trigger: str
    read: int = 0  # dead letters of this trigger (and reason) not read by an earlier redrive
    queued: int = 0  # tasks created
    duplicates: int = 0  # tasks that exist already (delivered again by the source), or a second letter of a message
    dead_lettered: int = 0  # refused again: the cause is not fixed (a new dead letter says why)
    ignored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why the refused ones were refused
    letters: list[dict[str, Any]] = field(default_factory=list)  # a dry run's: what each letter is and why
    refused: list[dict[str, Any]] = field(default_factory=list)  # unsigned or forged letters, not sent


def group_of(fleet: Fleet, trigger: str, reason: str | None = None) -> str:
    """The consumer group whose offsets say how far the trigger's dead letters (of one reason) have been redriven."""
    return f"{fleet.settings.redis.key_prefix}.redrive.{trigger}" + (f".{reason}" if reason else "")


class Marks:
    """How far each reason's own redrives went, read from their groups as the reasons turn up."""

    def __init__(self, fleet: Fleet, bootstrap: str, topic: str, trigger: str) -> None:
        self.fleet, self.bootstrap, self.topic, self.trigger = fleet, bootstrap, topic, trigger
        self._by_reason: dict[str, dict[int, int]] = {}

    def handled(self, reason: str, partition: int, offset: int) -> bool:
        if reason not in self._by_reason:
            group = group_of(self.fleet, self.trigger, reason)
            self._by_reason[reason] = committed(self.fleet.settings.kafka, self.bootstrap, self.topic, group)
        return offset < self._by_reason[reason].get(partition, 0)


def redrive(
    fleet: Fleet, trigger: str, reason: str | None = None, dry_run: bool = False, accept_unsigned: bool = False
) -> RedriveReport:
    """Send the trigger's dead letters not redriven before (or those of one ``reason``) through its intake again,
    as the trigger first saw them. Refused again, a message gets a new dead letter. Letters this fleet did not sign
    are not sent, unless ``accept_unsigned``."""
    settings, bootstrap, topic, done = _where(fleet, trigger, reason)
    kafka = fleet.settings.kafka
    marks = Marks(fleet, bootstrap, topic, trigger)
    key = _letter_key(fleet)
    report = RedriveReport(trigger)
    messages: dict[str, SourceMessage] = {}  # by the message's identity: one send each
    upto: dict[int, int] = {}  # partition -> where this read ended
    start_at = {(topic, p): offset for p, offset in done.items()}
    for r in read(kafka, bootstrap, [topic], threading.Event(), from_beginning=True, until_end=True, start_at=start_at):
        upto[r.partition] = r.offset + 1
        why = r.headers.get("reason") or ""
        if r.headers.get("trigger") != trigger or (reason is not None and why != reason):
            continue
        if reason is None and marks.handled(why, r.partition, r.offset):  # by a redrive of its reason alone
            continue
        report.read += 1
        signed = letters.verify(key, r.value, r.headers)
        if not signed and not accept_unsigned:
            _refuse(report, r)
            continue
        message = _message(settings, r)
        if message.default_id in messages:
            report.duplicates += 1
        messages[message.default_id] = message
        if dry_run:
            report.letters.append(
                {
                    "at": f"{r.topic}/{r.partition}/{r.offset}",
                    "reason": r.headers.get("reason"),
                    "detail": r.headers.get("detail", ""),
                    "source": message.source_id,
                    "id": message.default_id,
                    "signed": signed,
                }
            )
    if dry_run:
        return report
    if messages:
        _send(fleet, settings, list(messages.values()), report)
    if upto:  # what was read is durable now: the next redrive starts after it
        commit(kafka, bootstrap, topic, group_of(fleet, trigger, reason), upto)
    log.info(
        "redrive done",
        **{k: v for k, v in asdict(report).items() if isinstance(v, int)},
        trigger=trigger,
        refused=len(report.refused),
    )
    return report


def _where(fleet: Fleet, trigger: str, reason: str | None) -> tuple[TriggerSettings, str, str, dict[int, int]]:
    """The trigger, its dead-letter topic's bootstrap servers and name, and per partition where the redrives of all
    its letters stopped (with a ``reason``: or those of that reason alone, whichever went further)."""
    settings = fleet.triggers.get(trigger)
    if settings is None:
        raise NotFoundError("trigger_not_found", f"no trigger {trigger!r}; configured: {sorted(fleet.triggers)}")
    endpoint = parse_destination(settings.dead_letter or fleet.settings.defaults.dead_letter)
    if endpoint.scheme != "kafka":
        raise ConfigError(
            f"redrive reads dead letters back from Kafka only; trigger {trigger!r} sends them to {endpoint.scheme}://",
            fix="use a kafka:// dead_letter",
        )
    kafka, topic = fleet.settings.kafka, endpoint.path
    bootstrap = endpoint.hosts or kafka.bootstrap_servers
    done = committed(kafka, bootstrap, topic, group_of(fleet, trigger))
    if reason is not None:
        for p, offset in committed(kafka, bootstrap, topic, group_of(fleet, trigger, reason)).items():
            done[p] = max(done.get(p, 0), offset)
    return settings, bootstrap, topic, done


def _letter_key(fleet: Fleet) -> bytes:
    """The key this fleet signs its dead letters with (see :mod:`gpufleet.delivery.letters`)."""
    registry = Registry.for_fleet(fleet.settings)
    try:
        return letters.fleet_key(registry.client, registry.prefix)
    except REDIS_ERRORS as exc:
        raise BrokerError(f"cannot read the fleet's dead-letter key from Redis: {exc}") from exc
    finally:
        registry.client.close()


def _refuse(report: RedriveReport, r: KafkaRecord) -> None:
    """A letter this fleet did not sign: named in the report, not sent."""
    why = "forged or changed" if letters.SIGNATURE_HEADER in r.headers else "unsigned"
    at = f"{r.topic}/{r.partition}/{r.offset}"
    report.refused.append(
        {"at": at, "why": why, "reason": r.headers.get("reason"), "source": r.headers.get("source", r.key)}
    )
    log.warning("dead letter not redriven: this fleet did not sign it", at=at, why=why)


def _message(settings: TriggerSettings, r: KafkaRecord) -> SourceMessage:
    from gpufleet.aws import ObjectEvent
    from gpufleet.delivery.letters import DEFAULT_ID_HEADER, OBJECT_HEADER, SUPPLIED_ID_HEADER
    from gpufleet.triggers.ingest import SourceMessage

    headers = (
        {settings.id_header: r.headers[SUPPLIED_ID_HEADER].encode()}
        if (settings.id_header and SUPPLIED_ID_HEADER in r.headers)
        else {}
    )
    objects = (ObjectEvent.model_validate_json(r.value),) if r.headers.get(OBJECT_HEADER) else None
    # A dead letter written before they carried their default id: its bytes name it, the same each redrive.
    default_id = r.headers.get(DEFAULT_ID_HEADER) or f"redrive-{hashlib.sha256(r.value).hexdigest()[:32]}"
    return SourceMessage(r.value, r.headers.get("source", r.key), default_id, headers=headers, objects=objects)


def _send(fleet: Fleet, settings: TriggerSettings, messages: list[SourceMessage], report: RedriveReport) -> None:
    from gpufleet.triggers.ingest import Ingest

    ingest = Ingest(fleet, settings)
    try:
        for start in range(0, len(messages), settings.batch_max):
            batch = ingest.prepare(messages[start : start + settings.batch_max])
            result = ingest.publish(batch, threading.Event())
            assert result is not None  # never stopped: publish returns only once it is durable
            for dead in batch.dead:
                report.reasons[dead.headers["reason"]] = report.reasons.get(dead.headers["reason"], 0) + 1
            report.queued += result.published
            report.duplicates += result.duplicates
            report.dead_lettered += result.dead_lettered
            report.ignored += result.ignored
    finally:
        ingest.close()
