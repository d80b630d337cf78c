"""In-memory destination, for tests (gpufleet's and its users'): ``memory:///name``. No options.

Records stay in this process, in :data:`MemoryDestination.boxes` under the name. A name in
:data:`MemoryDestination.down` behaves as a server that is down: :meth:`~MemoryDestination.deliver` raises
:class:`~gpufleet.errors.DeliveryError`, and the caller retries. A batch is kept all or nothing.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, ClassVar

from gpufleet.destinations.base import OutRecord, Refusal
from gpufleet.errors import DeliveryError
from gpufleet.urls import Endpoint, Options

if TYPE_CHECKING:
    from gpufleet.settings import FleetSettings


class MemoryDestination:
    OPTIONS = Options
    boxes: ClassVar[dict[str, list[OutRecord]]] = {}
    down: ClassVar[set[str]] = set()
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, endpoint: Endpoint, settings: FleetSettings) -> None:
        self.name = endpoint.path

    def deliver(self, records: list[OutRecord]) -> list[Refusal]:
        with self._lock:
            if self.name in self.down:
                raise DeliveryError(f"memory destination {self.name!r} is down")
            self.boxes.setdefault(self.name, []).extend(records)
        return []

    def close(self) -> None:
        pass
