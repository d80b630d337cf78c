"""Which pool a task goes to: the overflow policy, pure (intake, the pool hand-over and ``bench/``'s simulator run
this same code).

A function lists its pools in order of preference (``Gpu(pools=("eu", "us"))``). A task goes to the first pool that
has a live worker for the function (of its GPU series, or any if it asks for ``any``) and an estimated queue wait
of at most the function's ``max_queue_wait_s``. When no pool qualifies, it goes to the live pool with the shortest
estimated wait (the earlier pool on a tie); when no pool has a live worker, to the first, whose queue keeps it until
a worker starts there.

The estimated wait of a new task in a pool, from what the pool's workers for the function have ahead of them:

    wait = 0                           if fewer tasks are queued there than workers are idle
    wait = queued_work_s / live_slots  otherwise

``queued_work_s`` is the work queued for those workers, each queued task counted at its function's recent mean
duration (see :class:`PoolState`). It leaves out what running tasks have left and what priorities reorder: it is an
estimate, for choosing a pool, not a promise.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

# A pool's name is one part of its queues' names (``gpufleet.<pool>.<model>.<function>``): no dots.
POOL_RE = re.compile(r"[a-z0-9][a-z0-9_-]{0,31}")


@dataclass(frozen=True)
class PoolState:
    """What one pool can do for one function now.

    Args:
        slots: live workers in the pool that serve the function.
        idle: of those, the ones running nothing.
        queued: tasks queued for those workers (the function's and the other functions' they serve).
        queued_work_s: the same tasks in seconds of work: each at its function's recent mean duration.
    """

    slots: int = 0
    idle: int = 0
    queued: int = 0
    queued_work_s: float = 0.0

    def wait_s(self) -> float:
        """The estimated queue wait of a task placed here now; infinite without a live worker."""
        if self.slots <= 0:
            return math.inf
        if self.queued < self.idle:
            return 0.0
        return self.queued_work_s / self.slots

    def plus(self, duration_s: float) -> PoolState:
        """This state after one more task of ``duration_s`` was queued here (a placer counts its own placements
        until it reads the pools again)."""
        return PoolState(self.slots, self.idle, self.queued + 1, self.queued_work_s + duration_s)


@dataclass(frozen=True)
class Placement:
    pool: str
    overflowed: bool  # not the function's first pool
    wait_s: float  # the estimate it was chosen on (inf: no live worker anywhere)


def place(pools: Sequence[str], states: Mapping[str, PoolState], max_queue_wait_s: float | None) -> Placement:
    """The pool for one task of a function with these ``pools`` (in order of preference); see the module's rule.
    ``max_queue_wait_s`` None: no wait is too long, so only a pool without a live worker is passed over."""
    if not pools:
        raise ValueError("a function has at least one pool")
    limit = math.inf if max_queue_wait_s is None else max_queue_wait_s
    waits = [states.get(pool, PoolState()).wait_s() for pool in pools]
    chosen = next((i for i, wait in enumerate(waits) if wait <= limit and wait != math.inf), None)
    if chosen is None:
        chosen = min(range(len(pools)), key=lambda i: (waits[i], i))  # all infinite: the first
    return Placement(pools[chosen], chosen != 0, waits[chosen])
