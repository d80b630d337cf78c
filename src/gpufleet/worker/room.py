"""Which functions a pool process's GPU has room for now (``Gpu(memory_gb=...)``), for its claims.

A function's tasks are taken only while the GPU's room (:attr:`~gpufleet.worker.gpus.GpuMemory.room_mb`: what is
free, and what this worker holds already) covers the function's ``memory_gb``, and a task that ran out of memory on a
GPU with less room (its ``min_room``) only by a GPU with more. The runtime leaves the other functions' queues out of
its own reads and hands back a delivered task of one, saying why: its status shows it as ``waiting_for``.
"""

from __future__ import annotations

import time

from gpufleet.functions import Function
from gpufleet.worker.bundle import ProcessBundle

# How long a pool process takes no task of a function after handing one back that needs more room than its GPU has
# (it ran out of memory on a GPU like this one): a GPU with more room takes it meanwhile.
ROOM_PAUSE_S = 1.0


class Room:
    def __init__(self, bundle: ProcessBundle) -> None:
        self.bundle = bundle
        self._sized = [fn for fn in bundle.fleet.functions.values() if fn.gpu.memory_mb is not None]
        self._paused: dict[str, float] = {}  # function -> until when this GPU takes none of its tasks

    def short(self) -> set[str]:
        """The functions this GPU has no room for now, and those paused here."""
        now = time.monotonic()
        paused = {name for name, until in self._paused.items() if until > now}
        if not self._sized:
            return paused
        memory = self.bundle.device.memory()
        if memory is None:
            return paused
        return paused | {fn.name for fn in self._sized if (fn.gpu.memory_mb or 0) > memory.room_mb}

    def pause(self, fn: Function) -> None:
        self._paused[fn.name] = time.monotonic() + ROOM_PAUSE_S

    def why_not(self, fn: Function, at_least: int = 0) -> str | None:
        """Why this GPU cannot take a task of ``fn`` now (one that needs ``at_least`` MiB of room, after it ran out
        of memory elsewhere), or None when it can."""
        need = max(fn.gpu.memory_mb or 0, at_least)
        memory = self.bundle.device.memory()
        if not need or memory is None or memory.room_mb >= need:
            return None
        what = f"{fn.name} needs {need} MiB"
        if need != fn.gpu.memory_mb:
            what = f"it ran out of memory on a GPU with less room: it needs {need} MiB"
        return (
            f"waits for GPU memory: {what}; {self.bundle.worker_name} has {memory.room_mb} MiB of "
            f"{memory.total_mb} ({memory.others_mb} MiB held by other processes)"
        )
