"""What every trigger shares: the :class:`Trigger` a role runs, and the base classes a backend builds on
(:class:`SourceTrigger`, and :class:`BatchTrigger`, whose backend supplies connect, receive and ack).

A trigger never runs GPU work. Per batch (see :class:`~gpufleet.triggers.ingest.Ingest`) it:

1. parses each message into tasks through :class:`~gpufleet.intake.path.Intake` (the path invoke takes too), or an
   :class:`EventError` reason;
2. publishes every task with one atomic Redis call (record + queue push; an id already known is a duplicate);
3. delivers dead letters (original bytes + reason) and waits for the broker's acknowledgement;
4. only then lets the source acknowledge (commit offsets, delete messages).

A failure in 2 or 3 is retried with backoff; the source is never acknowledged for unpublished work.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar, Generic, Protocol, TypeVar

import structlog

from gpufleet.credentials import redact_url
from gpufleet.triggers.ingest import Ingest, SourceMessage
from gpufleet.triggers.options import TriggerSettings
from gpufleet.urls import Options

if TYPE_CHECKING:
    from gpufleet.config import Fleet

log = structlog.get_logger("gpufleet.trigger")
S = TypeVar("S", bound=TriggerSettings)
LAG_EVERY_S = 10.0  # how often a trigger reports its source's backlog
# glibc's malloc gives the top of its heap back to the OS once 128 KiB are free there, and serves blocks over 128 KiB
# with mmap. A trigger frees each batch (a few MiB) before the next is built, so every batch paid its page faults
# again: on this VM, parse and build took 25 us per message instead of 15. Freed memory up to these sizes is kept.
MALLOC_TRIM_THRESHOLD = 64 << 20
MALLOC_MMAP_THRESHOLD = 16 << 20


def keep_freed_memory() -> None:
    """What a process that runs triggers sets for itself: glibc malloc's trim and mmap thresholds (see
    MALLOC_TRIM_THRESHOLD)."""
    try:
        mallopt = ctypes.CDLL(None).mallopt  # glibc; elsewhere the defaults stay
    except (AttributeError, OSError):
        return
    mallopt(-1, MALLOC_TRIM_THRESHOLD)  # M_TRIM_THRESHOLD
    mallopt(-3, MALLOC_MMAP_THRESHOLD)  # M_MMAP_THRESHOLD


class Trigger(Protocol):
    """A source of events: runs until ``stop`` is set, acknowledging only what is durably published."""

    name: str

    def run(self, stop: threading.Event) -> None: ...


@dataclass
class Received:
    """A batch from a source: its messages, and what the source needs to acknowledge them."""

    messages: list[SourceMessage]
    token: Any = None


class SourceTrigger(Generic[S]):
    """What every trigger class shares: built as ``cls(fleet, trigger)``, its source URL parsed, its
    :class:`Ingest` (parse, publish, dead-letter) and stats, and :meth:`close`. A class declares the model of its
    trigger file (``Settings``) and of its URL's options (``OPTIONS``)."""

    Settings: ClassVar[type[TriggerSettings]] = TriggerSettings
    OPTIONS: ClassVar[type[Options]] = Options

    def __init__(self, fleet: Fleet, trigger: S, ingest: Ingest | None = None) -> None:
        from gpufleet.triggers import parse_source

        self.name = trigger.name
        self.fleet = fleet
        self.trigger = trigger
        self.endpoint = parse_source(trigger.source)
        self.ingest = ingest or Ingest(fleet, trigger)
        self.stats = self.ingest.stats

    def close(self) -> None:
        self.ingest.close()


class BatchTrigger(SourceTrigger[S]):
    """The loop every pulling source shares: receive a batch, prepare it, publish it, and only then acknowledge it.

    A subclass says how to :meth:`connect`, :meth:`receive` and :meth:`ack` (and :meth:`disconnect`); a batch whose
    publish is cut short by ``stop`` is never acknowledged, so the source delivers it again and its tasks are
    suppressed as duplicates. A transient error of the source (``ConnectionError``/``OSError`` or
    :attr:`source_errors`) drops the connection and tries again with backoff.
    """

    source_errors: tuple[type[Exception], ...] = ()

    def connect(self) -> None:
        raise NotImplementedError

    def receive(self, stop: threading.Event) -> Received | None:
        """A batch, or None when nothing came within a short wait."""
        raise NotImplementedError

    def ack(self, batch: Received) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        pass

    def lag(self) -> tuple[str, dict[str, int]] | None:
        """The source's backlog, when it can tell: see :meth:`Ingest.report_lag`."""
        return None

    def publishing(self, batch: Received) -> AbstractContextManager[object]:
        """Held while a batch is published (SQS keeps its messages invisible meanwhile)."""
        return contextlib.nullcontext()

    def run(self, stop: threading.Event) -> None:
        log.info("trigger started", trigger=self.name, source=redact_url(self.trigger.source))
        transient: tuple[type[BaseException], ...] = (ConnectionError, OSError, *self.source_errors)
        backoff = 0.5
        try:
            while not stop.is_set():
                try:
                    self.connect()
                    next_lag = 0.0
                    while not stop.is_set():
                        if time.monotonic() >= next_lag:
                            next_lag = time.monotonic() + LAG_EVERY_S
                            self._report_lag()
                        got = self.receive(stop)
                        if got is None:
                            continue
                        if not self._handle(got, stop):
                            return  # stopping with work not durable: not acknowledged, delivered again
                        backoff = 0.5
                except transient as exc:
                    log.warning(
                        "source unavailable; reconnecting", trigger=self.name, error=str(exc), retry_in_s=backoff
                    )
                    self.disconnect()
                    stop.wait(backoff)
                    backoff = min(backoff * 2, 30.0)
        finally:
            self.disconnect()
            self.close()
            log.info("trigger stopped", trigger=self.name, **self.stats)

    def _report_lag(self) -> None:
        try:
            lag = self.lag()
        except Exception as exc:  # noqa: BLE001 - a figure for metrics must never stop the trigger
            log.debug("cannot read the source's backlog", trigger=self.name, error=str(exc))
            return
        if lag is not None:
            self.ingest.report_lag(*lag)

    def _handle(self, got: Received, stop: threading.Event) -> bool:
        prepared = self.ingest.prepare(got.messages)
        with self.publishing(got):
            if self.ingest.publish(prepared, stop) is None:
                return False
        self.ack(got)
        return True
