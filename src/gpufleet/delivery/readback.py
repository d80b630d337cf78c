"""Reading records back where they landed: ``gpufleet tail`` follows the fleet's success records, failure records and
dead letters, whatever kind of destination holds them (see :data:`gpufleet.destinations.READERS`: Kafka topics, S3
prefixes, SQS queues, RabbitMQ exchanges). ``gpufleet redrive`` reads a trigger's dead letters from Kafka
(:mod:`gpufleet.control.redrive`).

Each destination is followed by its own reader in a thread of its own; the records of all of them come out of one
iterator, in the order they are read. A reader whose server goes away says so once, reconnects with a backoff, and
goes on where it was.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import structlog

from gpufleet.credentials import redact_url
from gpufleet.destinations import open_reader
from gpufleet.errors import ConfigError

if TYPE_CHECKING:
    from gpufleet.config import Fleet
    from gpufleet.destinations.base import Landed, Reader

log = structlog.get_logger("gpufleet.delivery.readback")

KINDS = ("success", "failure", "dead_letter")
RECONNECT_S = 0.5
MAX_RECONNECT_S = 5.0


@dataclass(frozen=True)
class Source:
    kind: str  # success, failure or dead_letter
    url: str
    reader: Reader


@dataclass(frozen=True)
class Record:
    kind: str
    system: str  # Kafka, S3, SQS, RabbitMQ
    landed: Landed


@dataclass(frozen=True)
class Note:
    """What the follower says about a source: ``ready`` (following), ``lost`` (with the error), ``back``, or
    ``skipped`` (it cannot be read back as configured: the error says why and how to fix it)."""

    what: str
    source: Source
    error: BaseException | None = None
    after_s: float = 0.0


Outbox = queue.Queue[Record | Note | BaseException]  # what each source's thread hands the follower


def sources(fleet: Fleet, kinds: tuple[str, ...] = KINDS) -> tuple[list[Source], list[str]]:
    """Where records of these kinds land (the fleet's defaults, every function's and every trigger's) that can be
    read back, and the other destinations (http, sns), which cannot."""
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
        reader = open_reader(url, s)
        if reader is None:
            other.append(redact_url(url))
        else:
            found.append(Source(kind, url, reader))
    return found, other


def follow(found: list[Source], stop: threading.Event, from_beginning: bool = False) -> Iterator[Record | Note]:
    """The records of every source as they are read, with a :class:`Note` when a source is followed, lost or back.
    A source that cannot be reached before it was ever followed raises its error here (the caller says it once);
    one lost later is followed again once it is back. Runs until ``stop`` is set or the caller stops iterating."""
    out: Outbox = queue.Queue(maxsize=1000)
    for source in found:
        threading.Thread(
            target=_follow_one,
            args=(source, stop, from_beginning, out),
            daemon=True,
            name=f"gpufleet-tail-{source.kind}",
        ).start()
    try:
        while not stop.is_set():
            try:
                item = out.get(timeout=0.2)
            except queue.Empty:
                continue
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        for source in found:
            source.reader.close()


def _follow_one(source: Source, stop: threading.Event, from_beginning: bool, out: Outbox) -> None:
    reader, followed, lost_at, backoff = source.reader, False, 0.0, RECONNECT_S

    def ready() -> None:
        nonlocal followed, lost_at, backoff
        note = Note("back", source, after_s=time.monotonic() - lost_at) if followed else Note("ready", source)
        followed, lost_at, backoff = True, 0.0, RECONNECT_S
        out.put(note)

    while not stop.is_set():
        try:
            for landed in reader.follow(stop, from_beginning, ready):
                out.put(Record(source.kind, reader.system, landed))
            return
        except ConfigError as exc:  # this one cannot be read as configured; the others go on
            out.put(Note("skipped", source, exc))
            return
        except Exception as exc:  # noqa: BLE001 - whatever the client raises when its server goes away
            if not followed:
                out.put(exc)  # never reached: the caller says it once and stops
                return
            if not lost_at:  # one note an outage, not one a try
                lost_at = time.monotonic()
                out.put(Note("lost", source, exc))
            log.debug("reading back failed; trying again", where=reader.where, error=str(exc))
            stop.wait(backoff)
            backoff = min(backoff * 2, MAX_RECONNECT_S)
