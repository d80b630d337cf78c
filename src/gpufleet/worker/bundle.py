"""What a task's context and its outcome need of the pool process they run in, and nothing else of the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from gpufleet.config import Fleet
from gpufleet.objects import ObjectStore
from gpufleet.registry import Registry
from gpufleet.worker.lease import LeaseKeeper


class ProcessBundle(Protocol):
    """The per-process bundle: the fleet, this worker's identity (``worker_name``, ``gpu``), and the clients made
    after fork (registry, lease keeper, object store) with the scratch root. The runtime provides it; the one-attempt
    module of issue 26 will be built from it alone."""

    fleet: Fleet
    worker_name: str
    gpu: str
    scratch_root: Path

    @property
    def registry(self) -> Registry: ...

    @property
    def lease(self) -> LeaseKeeper: ...

    @property
    def objects(self) -> ObjectStore: ...
