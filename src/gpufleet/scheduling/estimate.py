"""How long a new task would wait in a pool: what placement compares (:mod:`gpufleet.scheduling.placement`).

From one reading of the fleet (:class:`FleetView`): the live GPUs, the tasks queued on each queue at each priority,
the tasks running, and each function's recent handler time on each GPU model. For a task of one function, priority
and memory need, in one pool:

- the GPUs that would run it: live, reading its queue, with room for it now (:func:`has_room`);
- what they have ahead of it: on every queue they read, of any pool, the tasks of its priority or higher (a lower one
  waits behind it), each GPU counted once: a queue that other GPUs read too is theirs in part (its share is the
  fraction of its readers that are these GPUs);
- each of those tasks at its function's recent handler time on these GPUs' model (on any model, when not measured
  on theirs; else the fleet's typical task; else ``DEFAULT_DURATION_S``), plus what the running tasks have left.

A task of N GPUs (``Gpu(count=N)``) runs on one of the pool's groups of N, which its one-GPU tasks share (see
:mod:`gpufleet.worker.holds`). Its slots are the groups; a group is ready at once when none of its GPUs runs
anything, when its own task ends (the group then goes on with the next task of N), or when the one-GPU tasks on its
GPUs end: at the latest, while one-GPU tasks wait to backfill it, a reservation (``reserve_after_s``) and one
one-GPU task after (:func:`group_ready_s`). Each task of N ahead of it takes the group that is whole first, for its
handler time (its GPU time over N), and it takes the first after them (:func:`gang_wait_s`).

It is an estimate, for choosing a pool, not a promise.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from gpufleet.registry.keyspace import US
from gpufleet.registry.messages import parse_queue

DEFAULT_DURATION_S = 1.0  # no task of any function has finished in this fleet yet
MIN_RECENT = 5  # finished tasks that make a recent mean


@dataclass(frozen=True)
class PoolState:
    """What one pool can do for one function now.

    Args:
        slots: live GPUs in the pool that would run the task (with room for it).
        idle: of those, the ones running nothing.
        queued: tasks ahead of it on those GPUs (a task that other GPUs may take counts in part).
        queued_work_s: the same in seconds of work, with what the running tasks have left.
    """

    slots: int = 0
    idle: int = 0
    queued: float = 0
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


def group_ready_s(left_s: Sequence[float], backfilled: bool, reserve_after_s: float, typical_s: float) -> float:
    """How soon a group of GPUs whose tasks have ``left_s`` to run (0: idle) is whole for a task that needs all of
    them: at once when every GPU is idle; when the last ends, if no one-GPU task will take a GPU that ends first;
    else (``backfilled``) once a reservation stopped them and the one-GPU tasks that started before it ended: the
    last of N ends ``typical_s`` x (1 + 1/2 + ... + 1/N) after it, on average."""
    last = max(left_s, default=0.0)
    if last <= 0:
        return 0.0
    if not backfilled:
        return last
    return max(last, reserve_after_s + typical_s * sum(1 / i for i in range(1, len(left_s) + 1)))


def gang_wait_s(ready_s: Sequence[float], ahead: float, duration_s: float) -> float:
    """The wait of a task of several GPUs with ``ahead`` tasks of its kind before it, on groups that are whole in
    ``ready_s``: each task takes the group that is whole first, which is whole again ``duration_s`` later."""
    if not ready_s:
        return math.inf
    heap = sorted(ready_s)
    for _ in range(round(ahead)):
        heapq.heapreplace(heap, heap[0] + duration_s)
    return heap[0]


def has_room(entry: Mapping[str, Any], need_mb: int | None) -> bool:
    """Whether a GPU of the inventory has room for ``need_mb`` now: all but what other processes hold (its worker's
    own memory is its functions'). A GPU whose memory is unknown (virtual, or NVML did not answer) has."""
    total, others = entry.get("memory_total_mb"), entry.get("memory_others_mb")
    if need_mb is None or not total or others is None:
        return True
    return int(total) - int(others) >= need_mb


@dataclass
class FleetView:
    """One reading of the fleet. ``entries``: the live GPUs of the inventory; ``levels``: queue -> tasks queued at
    each priority (0 to 9); ``means``: (function, model) -> recent handler seconds; ``running``: worker ->
    (function, started_at) of the task it runs; ``now``: when it was read (epoch seconds); ``gpus``: the GPUs a task of
    each function holds, where more than one; ``reserve_after_s``: the workers' (see the module's rule)."""

    prefix: str
    entries: list[dict[str, Any]] = field(default_factory=list)
    levels: dict[str, list[int]] = field(default_factory=dict)
    means: dict[tuple[str, str], float] = field(default_factory=dict)
    running: dict[str, tuple[str, float]] = field(default_factory=dict)
    now: float = 0.0
    gpus: Mapping[str, int] = field(default_factory=dict)
    reserve_after_s: float = 30.0

    def __post_init__(self) -> None:
        self._readers: dict[str, int] = {}
        for e in self.entries:
            for q in e.get("queues", []):
                self._readers[q] = self._readers.get(q, 0) + 1
        by_function: dict[str, list[float]] = {}
        for (function, _), mean in self.means.items():
            by_function.setdefault(function, []).append(mean)
        self._any_model = {f: sum(m) / len(m) for f, m in by_function.items()}
        self._typical = sum(self.means.values()) / len(self.means) if self.means else DEFAULT_DURATION_S
        ones = [m for (function, _), m in self.means.items() if function not in self.gpus]
        self._typical_one = sum(ones) / len(ones) if ones else self._typical  # a one-GPU task's

    def duration(self, function: str | None, models: list[str]) -> float:
        """A task of ``function``'s expected handler time on GPUs of ``models`` (its GPU time, over its GPUs)."""
        if function is None:  # a pool and model queue of an older release: any function's
            return self._typical
        measured = [self.means[function, m] for m in models if (function, m) in self.means]
        if measured:
            return sum(measured) / len(measured) / self.gpus.get(function, 1)
        return self._any_model.get(function, self._typical) / self.gpus.get(function, 1)

    def state(self, queue: str, need_mb: int | None, priority: int) -> PoolState:
        """The pool as a new task on ``queue`` sees it (see the module's rule)."""
        serving = [e for e in self.entries if queue in e.get("queues", []) and has_room(e, need_mb)]
        if not serving:
            return PoolState()
        models = sorted({str(e.get("model", "")) for e in serving})
        if all(e.get("gang") for e in serving):
            return self._gang_state(queue, serving, models, priority)
        queued = work = 0.0
        for q in {q for e in serving for q in e.get("queues", [])}:
            ahead = sum(self.levels.get(q, [])[priority:])
            if not ahead:
                continue
            share = sum(1 for e in serving if q in e.get("queues", [])) / self._readers[q]
            function = (parse_queue(self.prefix, q) or (None, None, None))[2]
            queued += ahead * share
            work += ahead * share * self.duration(function, models)
        idle = 0
        for e in serving:
            left = self._left(str(e.get("worker")), models)
            idle += left is None
            work += left or 0.0
        return PoolState(len(serving), idle, queued, work)

    def _gang_state(self, queue: str, gangs: list[dict[str, Any]], models: list[str], priority: int) -> PoolState:
        """The groups of GPUs a task of several GPUs runs on, as a :class:`PoolState` whose wait is
        :func:`gang_wait_s`'s (its work is that wait, over its groups): the tasks of its queue ahead of it each take
        the group that is whole first."""
        ahead = sum(self.levels.get(queue, [])[priority:])
        ready = [self._group_ready(e, models) for e in gangs]
        function = (parse_queue(self.prefix, queue) or (None, None, None))[2]
        wait = gang_wait_s(ready, ahead, self.duration(function, models))
        return PoolState(len(gangs), sum(r <= 0 for r in ready), ahead, wait * len(gangs))

    def _left(self, worker: str, models: list[str]) -> float | None:
        """What the task ``worker`` runs has left; None when it runs none."""
        task = self.running.get(worker)
        if task is None:
            return None
        function, started = task
        return max(0.0, self.duration(function, models) - (self.now - started))

    def _group_ready(self, entry: Mapping[str, Any], models: list[str]) -> float:
        """How soon the group of a worker of several GPUs is whole for its next task (:func:`group_ready_s`). Its
        GPUs' own workers read one-GPU queues, so a GPU of it that frees is taken again before the rest free (the
        worker idle longest takes the next task: Redis serves the longest-blocked BRPOP first): a busy group is
        whole once a reservation stopped them."""
        own = self._left(str(entry.get("worker")), models)
        if own is not None:
            return own  # it goes on with its next task on the same GPUs
        host = str(entry.get("worker", "")).partition("@")[2]
        left = [self._left(f"{gpu}@{host}", models) or 0.0 for gpu in entry["gang"]]
        return group_ready_s(left, True, self.reserve_after_s, self._typical_one)


class RecentMeans:
    """Each function's recent handler time per GPU model, from the GPU-time counters (``P:m:gpu_time``): the mean
    since the last reading that saw at least ``MIN_RECENT`` of its tasks finish, else the last such mean, else the
    mean over all time."""

    def __init__(self) -> None:
        self.means: dict[tuple[str, str], float] = {}
        self._seen: dict[tuple[str, str], tuple[int, int]] = {}  # (function, model) -> (µs, count) when last used

    def update(self, raw: Mapping[bytes, bytes]) -> dict[tuple[str, str], float]:
        totals: dict[tuple[str, str], list[int]] = {}
        for name, value in raw.items():
            function, model, _pool, part = name.decode().split(US)
            sums = totals.setdefault((function, model), [0, 0])
            sums[0 if part == "us" else 1] += int(value)
        for key, (us, count) in totals.items():
            before_us, before_count = self._seen.get(key, (0, 0))
            if count - before_count >= MIN_RECENT:
                self.means[key] = (us - before_us) / 1e6 / (count - before_count)
                self._seen[key] = (us, count)
            elif count and key not in self.means:
                self.means[key] = us / 1e6 / count
        return dict(self.means)
