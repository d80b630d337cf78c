"""The destination interface: deliver a batch of records; say which ones the destination refuses for good. And the
reader interface, for a destination whose records can be read back where they landed."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class OutRecord:
    """One record for a destination: a key (the task id), the value bytes and string headers."""

    key: str
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Refusal:
    """A record the destination will never accept as it is (too large, not allowed): sending it again is futile."""

    index: int  # its position in the batch
    reason: str


class Destination(Protocol):
    """Opened as ``cls(endpoint, settings)`` (see :func:`gpufleet.destinations.open_destination`); its class has
    ``OPTIONS``, the model of its URL options."""

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        """Deliver every record durably, except those refused for good, which are returned with the reason.

        Raises :class:`~gpufleet.errors.DeliveryError` when the batch may succeed later (destination down, timeout);
        the caller then sends the whole batch again (at-least-once), so consumers de-duplicate on the key. Refused
        records are parked by the caller, never retried in a loop, so one bad record cannot hold up the others.
        """

    def close(self) -> None: ...


@dataclass(frozen=True)
class Landed:
    """A record as read back from where a destination put it."""

    where: str  # the topic, queue or s3://bucket/prefix
    position: str  # where in it: partition/offset, the object's key, the message's id
    timestamp: float  # when it landed (seconds since the epoch)
    key: str  # the task id (a dead letter's own id)
    headers: dict[str, str]
    value: bytes


class Reader(Protocol):
    """Reads back what one destination wrote (``gpufleet tail``), without taking it from its consumers downstream.
    Opened as ``cls(endpoint, settings)`` from :data:`gpufleet.destinations.READERS`; ``system`` names its server in
    messages (``Kafka``, ``S3``); ``history`` says whether it can show what landed before it started."""

    system: str
    where: str
    history: bool

    def follow(self, stop: threading.Event, from_beginning: bool, on_ready: Callable[[], None]) -> Iterator[Landed]:
        """Records as they land, until ``stop``; with ``from_beginning`` (and ``history``) those kept so far first.
        ``on_ready`` is called once the starting point is fixed: a record that lands after it is read.

        Raises what its client raises when the server cannot be reached; called again, it goes on where the last
        call left off (``from_beginning`` then applies only to what it has not read yet)."""
        ...

    def close(self) -> None: ...
