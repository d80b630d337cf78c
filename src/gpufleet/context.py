"""What a handler receives besides its event: ``ctx``, a :class:`Context` for one event, or a :class:`BatchContext`
for a batch function's call. These are the protocols; the worker runtime provides the implementation
(:mod:`gpufleet.worker.context`)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from structlog.typing import FilteringBoundLogger

    from gpufleet.worker.gpus import GpuMemory


class _Where(Protocol):
    """What a handler's ``ctx`` says about where it runs, for one task or a batch."""

    function: str
    worker: str
    gpu: str
    state: Any  # what setup() returned in this process
    log: FilteringBoundLogger

    @property
    def gpu_memory(self) -> GpuMemory | None:
        """The GPU's memory now, in MiB (``total_mb``, ``free_mb``, ``used_mb``; ``own_mb`` held by this worker,
        ``others_mb`` by other processes), from NVML; None on a virtual GPU."""


class Context(_Where, Protocol):
    """What a handler receives besides its event. The worker runtime provides the implementation."""

    task_id: str
    attempt: int

    def progress(self, fraction: float, message: str = "") -> None:
        """Report progress, 0..1 plus a short message; visible in the task's status."""

    @property
    def cancelled(self) -> bool:
        """True once somebody asked this task to stop; a long handler should check it and return early."""

    def checkpoint(self, state: Any) -> None:
        """Save ``state`` (any JSON value) durably; a later attempt of this task reads it as ``resume_from``."""

    @property
    def resume_from(self) -> Any:
        """The state an earlier attempt of this task last saved with ``checkpoint``; None for none."""

    @property
    def traceparent(self) -> str | None:
        """The task's W3C trace context: send it as the ``traceparent`` header of calls the handler makes."""

    @property
    def scratch(self) -> Path:
        """This attempt's own empty directory, removed when the attempt ends."""

    def download(self, obj: Any = None) -> Path:
        """Stream an object (this task's object event by default, or an ``s3://`` URI) into ``scratch``."""

    def read(self, uri: str, start: int | None = None, end: int | None = None) -> bytes:
        """The bytes of an ``s3://`` object, or of its byte range ``[start, end)``, in memory."""

    def upload(
        self, path: str | Path, name: str | None = None, content_type: str | None = None, to: str | None = None
    ) -> str:
        """Upload an output to the trigger's ``output`` location (or ``to``, an ``s3://bucket/prefix``); returns its
        ``s3://`` URI, which the success record lists under ``responseContext.outputs``."""


class BatchContext(_Where, Protocol):
    """What a batch handler receives besides its list of events: one :class:`Context` per event, in order."""

    items: list[Context]

    def progress(self, fraction: float, message: str = "") -> None:
        """The same progress for every event of the batch (``items[i].progress`` reports one)."""

    @property
    def cancelled(self) -> bool:
        """True once every event of the batch was asked to stop (``items[i].cancelled`` tells one)."""
