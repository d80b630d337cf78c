"""The destination interface: deliver a batch of records; say which ones the destination refuses for good."""

from __future__ import annotations

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
