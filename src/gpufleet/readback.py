"""Reading records back from the destinations: ``gpufleet tail`` follows them live, ``gpufleet redrive`` re-sends
dead letters through intake.

Kafka destinations only, for now: a topic keeps its records for every reader, so reading them back takes nothing
from the consumers downstream. Each is read without a consumer group (partitions assigned by hand, no commits), so
a reader never joins, rebalances or moves anyone's offsets.

A redrive keeps each event's identity. A dead letter carries the source message's default id (and the producer's
id header, when the trigger reads one), so the event it re-sends gets the task id it would have got the first time;
a redrive that is repeated, or that overlaps a source that delivered the message again, runs nothing twice.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.destinations import parse_destination
from gpufleet.errors import BrokerError, ConfigError, NotFoundError, unreachable_hint

if TYPE_CHECKING:
    from gpufleet.settings import Fleet

log = structlog.get_logger("gpufleet.readback")
KINDS = ("success", "failure", "dead_letter")
TOPIC_LOOK_S = 2.0
BOOTSTRAP_TIMEOUT_MS = 5000  # how often a live reader looks for topics that did not exist yet


@dataclass(frozen=True)
class Stream:
    kind: str  # success, failure or dead_letter
    url: str
    bootstrap: str
    topic: str


@dataclass(frozen=True)
class Record:
    kind: str
    topic: str
    partition: int
    offset: int
    timestamp: float
    key: str
    headers: dict[str, str]
    value: bytes


@dataclass
class RedriveReport:
    trigger: str
    read: int = 0  # dead letters of this trigger (and reason) found
    queued: int = 0  # tasks created
    duplicates: int = 0  # tasks that exist already: redriven before, or delivered again by the source
    dead_lettered: int = 0  # refused again: the cause is not fixed (a new dead letter says why)
    ignored: int = 0
    reasons: dict[str, int] = field(default_factory=dict)  # why the refused ones were refused


def streams(fleet: Fleet, kinds: tuple[str, ...] = KINDS) -> tuple[list[Stream], list[str]]:
    """The Kafka topics records of these kinds go to (the fleet's defaults, every function's and every
    trigger's), and the other destinations, which cannot be read back."""
    s = fleet.settings
    urls: set[tuple[str, str]] = set()
    for kind in kinds:
        if kind == "dead_letter":
            urls.add((kind, s.defaults.dead_letter))
            urls |= {(kind, t.dead_letter) for t in fleet.triggers.values() if t.dead_letter}
            continue
        urls.add((kind, getattr(s.defaults, f"on_{kind}")))
        urls |= {(kind, u) for fn in fleet.functions.values() if (u := getattr(fn, f"on_{kind}"))}
        urls |= {(kind, u) for t in fleet.triggers.values() if (u := getattr(t, f"on_{kind}"))}
    found, other = [], []
    for kind, url in sorted(urls):
        endpoint = parse_destination(url)
        if endpoint.scheme == "kafka":
            found.append(Stream(kind, url, endpoint.hosts or s.kafka.bootstrap_servers, endpoint.path))
        else:
            other.append(url)
    return found, other


def read(fleet: Fleet, wanted: list[Stream], stop: threading.Event, *, from_beginning: bool = False,
         until_end: bool = False, poll_ms: int = 200, on_ready: Callable[[], None] | None = None,
         ) -> Iterator[Record]:  # fmt: skip
    """Records of the ``wanted`` streams: from the end (new ones only) or the beginning; live until ``stop``, or
    with ``until_end`` only up to the end each partition had when reading began. ``on_ready`` is called once the
    starting positions are fixed: a record written after it is read."""
    by_cluster: dict[str, list[Stream]] = {}
    for stream in wanted:
        by_cluster.setdefault(stream.bootstrap, []).append(stream)
    if len(by_cluster) > 1:
        raise ConfigError("these records are on several Kafka clusters; read one kind at a time",
                          fix="pass --success, --failure or --dead-letters")  # fmt: skip
    if not wanted:
        return
    bootstrap, topics = next(iter(by_cluster.items()))
    kind_of = {s.topic: s.kind for s in topics}
    consumer = _consumer(fleet, bootstrap)
    try:
        parts = _assign(consumer, kind_of, [], from_beginning)
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
                parts, next_look = _assign(consumer, kind_of, parts, True), time.monotonic() + TOPIC_LOOK_S
            if not parts:
                stop.wait(poll_ms / 1000)
                continue
            for tp, batch in consumer.poll(timeout_ms=poll_ms).items():
                for r in batch:
                    if until_end and r.offset >= ends.setdefault(tp, consumer.highwater(tp) or r.offset + 1):
                        continue
                    yield Record(kind_of[r.topic], r.topic, r.partition, r.offset, r.timestamp / 1000,
                                 r.key.decode(errors="replace") if r.key else "",
                                 {k: v.decode(errors="replace") for k, v in r.headers or [] if v is not None},
                                 r.value or b"")  # fmt: skip
    finally:
        consumer.close()


def _assign(consumer: Any, topics: dict[str, str], assigned: list[Any], from_beginning: bool) -> list[Any]:
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


def _consumer(fleet: Fleet, bootstrap: str) -> Any:
    from kafka import KafkaConsumer
    from kafka.errors import KafkaConnectionError, KafkaTimeoutError

    k = fleet.settings.kafka
    try:
        # A person waits at the other end: an unreachable Kafka is said within BOOTSTRAP_TIMEOUT_MS, not 30 s
        # (kafka-python 3 has the setting; 2.x bootstraps within request_timeout_ms).
        quick = (
            {"bootstrap_timeout_ms": BOOTSTRAP_TIMEOUT_MS}
            if "bootstrap_timeout_ms" in KafkaConsumer.DEFAULT_CONFIG
            else {}
        )
        return KafkaConsumer(bootstrap_servers=bootstrap.split(","), client_id=f"{k.client_id}-readback",
                             enable_auto_commit=False, request_timeout_ms=k.request_timeout_ms, **quick)  # fmt: skip
    except (KafkaTimeoutError, KafkaConnectionError) as exc:  # no broker answered
        hint = unreachable_hint("Kafka", "kafka.bootstrap_servers")
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc} ({hint})") from None


def redrive(fleet: Fleet, trigger: str, reason: str | None = None, dry_run: bool = False) -> RedriveReport:
    """Send a trigger's dead letters (every one on its dead-letter topic, or those of one ``reason``) through its
    intake again, as the trigger first saw them. Refused again, a message gets a new dead letter."""
    from gpufleet.objects import ObjectEvent
    from gpufleet.triggers.base import DEFAULT_ID_HEADER, OBJECT_HEADER, SUPPLIED_ID_HEADER, Ingest, SourceMessage

    settings = fleet.triggers.get(trigger)
    if settings is None:
        raise NotFoundError("trigger_not_found", f"no trigger {trigger!r}; configured: {sorted(fleet.triggers)}")
    url = settings.dead_letter or fleet.settings.defaults.dead_letter
    endpoint = parse_destination(url)
    if endpoint.scheme != "kafka":
        raise ConfigError(f"redrive reads dead letters back from Kafka only; trigger {trigger!r} sends them to "
                          f"{endpoint.scheme}://", fix="use a kafka:// dead_letter")  # fmt: skip
    stream = Stream("dead_letter", url, endpoint.hosts or fleet.settings.kafka.bootstrap_servers, endpoint.path)
    report = RedriveReport(trigger)
    messages = []
    for r in read(fleet, [stream], threading.Event(), from_beginning=True, until_end=True):
        if r.headers.get("trigger") != trigger or (reason is not None and r.headers.get("reason") != reason):
            continue
        report.read += 1
        headers = {settings.id_header: r.headers[SUPPLIED_ID_HEADER].encode()} if (
            settings.id_header and SUPPLIED_ID_HEADER in r.headers) else {}  # fmt: skip
        objects = (ObjectEvent.model_validate_json(r.value),) if r.headers.get(OBJECT_HEADER) else None
        # A dead letter written before they carried their default id: its bytes name it, the same each redrive.
        default_id = r.headers.get(DEFAULT_ID_HEADER) or f"redrive-{hashlib.sha256(r.value).hexdigest()[:32]}"
        messages.append(SourceMessage(r.value, r.headers.get("source", r.key), default_id, headers=headers,
                                      objects=objects))  # fmt: skip
    if dry_run or not messages:
        return report
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
    log.info("redrive done", trigger=trigger, read=report.read, queued=report.queued, duplicates=report.duplicates,
             dead_lettered=report.dead_lettered)  # fmt: skip
    return report
