"""Reading records back from the destinations: ``gpufleet tail`` follows them live, and ``gpufleet redrive`` (see
:mod:`gpufleet.control.redrive`) reads dead letters.

Kafka destinations only, for now: a topic keeps its records for every reader, so reading them back takes nothing
from the consumers downstream. Partitions are assigned by hand, so a reader never joins or rebalances anyone's
group; only a redrive keeps offsets, in a group of its own.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.destinations import parse_destination
from gpufleet.errors import BrokerError, ConfigError, unreachable_hint

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.delivery.readback")


def kafka_errors() -> tuple[type[Exception], ...]:
    """What reading from Kafka raises when the broker goes away: a reader reconnects on these."""
    from kafka.errors import KafkaError

    return (KafkaError, OSError)


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
         start_at: Mapping[tuple[str, int], int] | None = None) -> Iterator[Record]:  # fmt: skip
    """Records of the ``wanted`` streams: from the end (new ones only) or the beginning, or for a (topic, partition)
    in ``start_at`` from that offset; live until ``stop``, or with ``until_end`` only up to the end each partition
    had when reading began. ``on_ready`` is called once the starting positions are fixed: a record written after it
    is read."""
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


def committed(fleet: Fleet, stream: Stream, group: str) -> dict[int, int]:
    """``group``'s committed offset for each partition of ``stream`` that has one."""
    from kafka import TopicPartition

    consumer = _consumer(fleet, stream.bootstrap, group)
    try:
        found = {}
        for p in consumer.partitions_for_topic(stream.topic) or []:
            offset = consumer.committed(TopicPartition(stream.topic, p))
            if offset is not None and offset >= 0:
                found[p] = offset
        return found
    finally:
        consumer.close()


def commit(fleet: Fleet, stream: Stream, group: str, offsets: Mapping[int, int]) -> None:
    """Commit ``group``'s offset for partitions of ``stream`` (partition -> the next offset to read). No metadata:
    some Kafka-compatible brokers (tansu) do not keep it."""
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    consumer = _consumer(fleet, stream.bootstrap, group)
    try:
        consumer.commit({TopicPartition(stream.topic, p): OffsetAndMetadata(o, "", -1) for p, o in offsets.items()})
    finally:
        consumer.close()


def _consumer(fleet: Fleet, bootstrap: str, group: str | None = None) -> Any:
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
                             group_id=group, enable_auto_commit=False, request_timeout_ms=k.request_timeout_ms,
                             auto_offset_reset="earliest", **quick)  # fmt: skip
    except (KafkaTimeoutError, KafkaConnectionError) as exc:  # no broker answered
        hint = unreachable_hint("Kafka", "kafka.bootstrap_servers")
        raise BrokerError(f"cannot reach Kafka at {bootstrap}: {exc} ({hint})") from None
