"""Tasks that need several GPUs of one host, beside tasks that need one.

A function of ``Gpu(count=N)`` runs in a worker process of its own that sees N GPUs: one of the host's aligned groups
of N (0-1, 2-3... for 2; 0-3, 4-7 for 4), as NVLink joins them. The host's one-GPU workers share those GPUs, so each
worker whose GPUs another worker may use takes all of them in Redis (``P:holds:<host>``, ``hold.lua``) before it
runs a task, at once or not at all: none holds one GPU while it waits for another, so two 2-GPU tasks on 3 GPUs never
each hold one and wait for the other. It lets them go when it has no task in hand.

One-GPU tasks backfill the GPUs a waiting multi-GPU task cannot have yet. So that it is never starved, once it has
waited ``worker.reserve_after_s`` it reserves them: their other workers finish the task they run and take no new one
until it has them all. Only as many multi-GPU workers reserve as there are tasks waiting for them, fleet-wide (a
ticket each, ``P:tickets:<queue>``; when fewer wait, the first to ask gives its ticket and reservations back). A
reservation lapses once its worker stops asking (its queue is empty, or it died). A process that dies holding GPUs
is replaced under its name, and the replacement lets them go first; a supervisor that starts clears its host's
holds, as none of its processes runs yet.

Workers whose GPUs no multi-GPU worker shares (a host that serves no such function) never read or write any of it.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

from gpufleet.registry.keyspace import script
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry

log = structlog.get_logger("gpufleet.worker")

STALE_S = 2.0  # a reservation its worker has not renewed this long lapses (a waiting worker renews it 4 times a second)
CHECK_S = 0.25  # how often a worker that holds its GPUs looks for a reservation that asks it to let them go


class Holds:
    """The GPUs one worker process must hold to run a task: none when no multi-GPU worker shares them."""

    def __init__(
        self,
        registry: Registry,
        host: str,
        worker: str,
        indices: tuple[int, ...],
        reserve_after_s: float,
        queues: list[str] | None = None,
    ) -> None:
        self.registry, self.keys = registry, registry.keys
        self.client: Any = registry.client
        self.worker, self.indices = worker, indices
        self.key = self.keys.holds(host)
        self.queues = queues or []  # a multi-GPU worker's: the tasks that wait there are what it reserves for
        self.reserve_after_s = reserve_after_s
        self.held = False
        self._hold = self.client.register_script(script("hold"))
        self._unhold = self.client.register_script(script("unhold"))
        self._looked: tuple[float, bool] = (-CHECK_S, False)

    @property
    def shared(self) -> bool:
        return bool(self.indices)

    @property
    def gang(self) -> bool:
        """Whether this worker needs several GPUs: it reserves them while it waits."""
        return len(self.indices) > 1

    def take(self, waiting: int = 1) -> bool:
        """Hold every GPU of this worker, or none: then a multi-GPU worker reserves them, if fewer of its kind do
        than the ``waiting`` tasks of its queues (see ``hold.lua``)."""
        if not self.indices or self.held:
            return True
        tickets = self.keys.tickets(self.queues[0]) if self.gang and self.queues else ""
        args: list[Any] = [time.time(), self.worker, self.reserve_after_s, STALE_S, tickets, waiting, *self.indices]
        self.held = bool(self._hold(keys=[self.key], args=args))
        if self.held:  # hold.lua found no other holder and no reservation owed
            self._looked = (time.monotonic(), False)
        return self.held

    def release(self, always: bool = False) -> None:
        """Let its GPUs go (``always``: whatever this process thinks it holds: a replaced one's too)."""
        if self.indices and (self.held or always):
            self._unhold(keys=[self.key], args=[self.worker, *self.indices])
            self.held = False

    def take_or_warn(self, waiting: int = 1) -> bool:
        """:meth:`take`, False where Redis cannot say (the task goes back: its GPUs may be another's)."""
        try:
            return self.take(waiting)
        except REDIS_ERRORS:
            log.warning("cannot take this worker's GPUs in Redis; the task goes back", exc_info=True)
            return False

    def let_go(self) -> None:
        """:meth:`release`, where Redis answers (else its replacement, or this process's next release, lets go)."""
        try:
            self.release()
        except REDIS_ERRORS:
            log.warning("cannot let go of this worker's GPUs in Redis", exc_info=True)

    def yielding(self) -> bool:
        """Whether another worker may not be kept from these GPUs any longer (its reservation matured), or holds one:
        this worker takes no new task. Read at most every ``CHECK_S``."""
        if not self.indices:
            return False
        now = time.monotonic()
        if now - self._looked[0] < CHECK_S:
            return self._looked[1]
        fields = [str(i) for i in self.indices] + [f"r{i}" for i in self.indices]
        raw = self.client.hmget(self.key, fields)
        n, t = len(self.indices), time.time()
        taken = any(h is not None and h.decode() != self.worker for h in raw[:n])
        self._looked = (now, taken or any(self._matured(r, t) for r in raw[n:]))
        return self._looked[1]

    def _matured(self, raw: bytes | None, now: float) -> bool:
        if raw is None:
            return False
        who, since, seen = raw.decode().split()
        return who != self.worker and now - float(seen) < STALE_S and now - float(since) >= self.reserve_after_s

    def waiting(self) -> int:
        """How many tasks wait in this worker's queues (a multi-GPU worker reserves its GPUs only for one)."""
        return sum(self.registry.waiting(self.queues))
