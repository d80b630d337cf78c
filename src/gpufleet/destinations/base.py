"""The destination interface: deliver a batch of records, all or nothing."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol


@dataclass(frozen=True)
class OutRecord:
    """One record for a destination: a key (the task id), the value bytes and string headers."""

    key: str
    value: bytes
    headers: dict[str, str] = field(default_factory=dict)


class Destination(Protocol):
    def deliver(self, records: list[OutRecord]) -> None:
        """Deliver every record durably, or raise :class:`~gpufleet.errors.DeliveryError`.

        At-least-once: after an error the caller sends the whole batch again, so consumers de-duplicate on the key.
        """

    def close(self) -> None: ...
