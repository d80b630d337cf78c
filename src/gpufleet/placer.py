"""Intake's side of overflow: the pools as the fleet reports them, read at most once a second, and the queue each task
of a function with several pools goes to (the policy itself is :mod:`gpufleet.placement`).

What is read, per refresh (one pipeline): the GPU inventory (which live slot reads which queue, and which runs a
task), each pool's queued tasks (``ZCARD`` of the queues those slots read) and the functions' durations (the
duration histogram's sum and count; the mean over the last refreshes that saw at least ``MIN_RECENT`` tasks finish,
else over all time, else ``DEFAULT_DURATION_S``). Between refreshes the placer counts its own placements
(:meth:`PoolState.plus`), so a burst that arrives within one second does not all go to the pool that was idle.
A function with one pool never reads anything: its queue is fixed.
"""

from __future__ import annotations

import threading
import time
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.lua import US
from gpufleet.messages import parse_queue, queue_name
from gpufleet.placement import Placement, PoolState, place

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gpufleet.functions import Function
    from gpufleet.registry import EnvelopeFor, Registry

log = structlog.get_logger("gpufleet.placer")

REFRESH_S = 1.0
# A GPU whose host has not refreshed the inventory for this long (three of its 2 s refreshes) counts as gone: no task
# is placed there, and what waits there is handed over (the inventory itself marks it stale only after 30 s).
LIVE_S = 6.0
HAND_OVER_MAX = 200  # tasks moved per pool and function per round
MIN_RECENT = 5  # finished tasks that make a recent mean duration
DEFAULT_DURATION_S = 1.0  # a function that never finished a task here


class Placer:
    def __init__(self, registry: Registry, functions: Iterable[Function], refresh_s: float = REFRESH_S) -> None:
        self.registry = registry
        self.functions = [fn for fn in functions if len(fn.gpu.pools) > 1]
        self.prefix = registry.prefix
        self.refresh_s = refresh_s
        self._lock = threading.Lock()  # the API places from several threads
        self._read_at = -refresh_s
        self._states: dict[tuple[str, str], PoolState] = {}  # (function, pool) -> state
        self._hosted: set[tuple[str, str]] = set()  # (function, pool) with a host that reads its queue, up or not
        self._means: dict[str, float] = {}
        self._seen: dict[str, tuple[float, int]] = {}  # function -> (duration sum, count) at the last refresh

    def queue_for(self, fn: Function, version: str | None = None) -> tuple[str, Placement | None]:
        """The queue for one new task of ``fn`` (of ``version``, if one was asked for), and the placement it came
        from (None: one pool, nothing to choose). A version's task is placed from its function's view of the pools."""
        if len(fn.gpu.pools) == 1:
            return queue_name(self.prefix, fn.gpu.pools[0], fn.gpu.model, fn.name, version), None
        with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                self._refresh()
            states = {pool: self._states.get((fn.name, pool), PoolState()) for pool in fn.gpu.pools}
            chosen = place(fn.gpu.pools, states, fn.gpu.max_queue_wait_s)
            key = (fn.name, chosen.pool)
            self._states[key] = states[chosen.pool].plus(self._means.get(fn.name, DEFAULT_DURATION_S))
        return queue_name(self.prefix, chosen.pool, fn.gpu.model, fn.name, version), chosen

    def _refresh(self) -> None:
        try:
            entries = self.registry.gpus(stale_after_s=LIVE_S)
            queues = sorted({q for e in entries if e.get("up") and not e["stale"] for q in e.get("queues", [])})
            pipe = self.registry.pipeline()
            for queue in queues:
                pipe.zcard(f"{self.prefix}:pending:{queue}")
            pipe.hgetall(f"{self.prefix}:m:duration")
            *depths, durations = pipe.execute()
        except Exception as exc:  # noqa: BLE001 - no view of the pools: keep the last one, and say so
            log.warning("cannot read the pools for placement; using the last view", error=str(exc))
            self._read_at = time.monotonic()
            return
        self._read_at = time.monotonic()
        self._means = self._recent_means(durations)
        queued = dict(zip(queues, depths, strict=True))
        self._states = {}
        self._hosted = set()
        for fn in self.functions:
            for pool in fn.gpu.pools:
                self._states[(fn.name, pool)] = self._state(fn, pool, entries, queued)
                mine = queue_name(self.prefix, pool, fn.gpu.model, fn.name)
                if any(not e["stale"] and mine in e.get("queues", []) for e in entries):
                    self._hosted.add((fn.name, pool))

    def hand_over(self, envelope_for: EnvelopeFor) -> int:
        """Move what waits in a pool where no host serves its function any more (none has refreshed the inventory
        for ``LIVE_S``) to the pool the policy picks now (a live one, or none: then it stays). A host whose GPU
        worker is restarting still serves: its tasks wait for it. Any number of processes may run this at once:
        each move is checked in Redis (``MOVE_QUEUED``). Returns how many tasks moved."""
        moved = 0
        with self._lock:
            self._refresh()
            for fn in self.functions:
                for pool in fn.gpu.pools:
                    if (fn.name, pool) in self._hosted:
                        continue
                    queue = queue_name(self.prefix, pool, fn.gpu.model, fn.name)
                    waiting = [i.decode() for i in self.registry.client.zrange(  # type: ignore[union-attr]
                        f"{self.prefix}:pending:{queue}", 0, HAND_OVER_MAX - 1)]  # fmt: skip
                    if waiting:
                        moved += self._move(fn, pool, queue, waiting, envelope_for)
        return moved

    def _move(self, fn: Function, pool: str, queue: str, waiting: list[str], envelope_for: EnvelopeFor) -> int:
        targets: dict[str, list[str]] = {}
        for task_id in waiting:
            states = {p: self._states.get((fn.name, p), PoolState()) for p in fn.gpu.pools}
            chosen = place(fn.gpu.pools, states, fn.gpu.max_queue_wait_s)
            if chosen.pool == pool:  # no live pool anywhere: it waits where it is
                return 0
            self._states[(fn.name, chosen.pool)] = states[chosen.pool].plus(
                self._means.get(fn.name, DEFAULT_DURATION_S)
            )
            targets.setdefault(chosen.pool, []).append(task_id)
        moved = 0
        for to, ids in targets.items():
            n = self.registry.move_queued(ids, queue, queue_name(self.prefix, to, fn.gpu.model, fn.name), envelope_for,
                                          (pool, to))  # fmt: skip
            log.info("tasks handed over: no live worker in their pool", function=fn.name, from_pool=pool, to_pool=to,
                     count=n)  # fmt: skip
            moved += n
        return moved

    def _state(self, fn: Function, pool: str, entries: list[dict[str, Any]], queued: dict[str, int]) -> PoolState:
        mine = queue_name(self.prefix, pool, fn.gpu.model, fn.name)
        serving = [e for e in entries if e.get("up") and not e["stale"] and mine in e.get("queues", [])]
        ahead = {q for e in serving for q in e.get("queues", []) if (parse_queue(self.prefix, q) or ("",))[0] == pool}
        work = 0.0
        for q in ahead:
            parsed = parse_queue(self.prefix, q)
            function = parsed[2] if parsed else None
            work += queued.get(q, 0) * self._means.get(function or "", DEFAULT_DURATION_S)
        idle = sum(1 for e in serving if not e.get("task_id"))
        return PoolState(len(serving), idle, sum(queued.get(q, 0) for q in ahead), work)

    def _recent_means(self, raw: dict[bytes, bytes]) -> dict[str, float]:
        totals: dict[str, list[float]] = {}
        for field, value in raw.items():
            fn, _, part = field.decode().partition(US)
            sums = totals.setdefault(fn, [0.0, 0.0])
            if part == "sum":
                sums[0] = float(value)
            else:
                sums[1] += int(value)
        means = {}
        for fn, (total, count) in totals.items():
            before_total, before_count = self._seen.get(fn, (0.0, 0))
            if count - before_count >= MIN_RECENT:
                means[fn] = (total - before_total) / (count - before_count)
                self._seen[fn] = (total, int(count))
            elif count:
                means[fn] = self._means.get(fn, total / count)
        return means
