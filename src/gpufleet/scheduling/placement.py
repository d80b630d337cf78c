"""Which pool a task goes to: the overflow policy (:func:`place`, pure: intake, the pool hand-over and ``bench/``'s
simulator run this same code), and intake's side of it (:class:`Placer`).

A function lists its pools in order of preference (``Gpu(pools=("eu", "us"))``). A task goes to the first pool that
has a live worker for the function (of its GPU series, or any if it asks for ``any``) and an estimated queue wait
of at most the function's ``max_queue_wait_s``. When no pool qualifies, it goes to the live pool with the shortest
estimated wait (the earlier pool on a tie); when no pool has a live worker, to the first, whose queue keeps it until
a worker starts there.

The estimated wait of a new task in a pool (:mod:`gpufleet.scheduling.estimate`): zero while fewer tasks are ahead
of it than the GPUs that would run it are idle, else the work ahead of it (queued at its priority or higher, and what
the running tasks have left, at each function's measured time on those GPUs' model) over those GPUs, each GPU counted
once across the pools it serves. A GPU counts for a function with ``memory_gb`` only while it has room for it, and a
GPU too small for it never reads its queues: a pool whose GPUs are all too small, or full, is not a candidate.

Intake's side of overflow: the pools as the fleet reports them, read at most once a second (one pipeline: the
inventory, the tasks running, each queue's tasks by priority, the GPU time counters), and the queue each task of a
function with several pools goes to (:class:`Placer`). Between readings the placer counts its own placements
(:meth:`PoolState.plus`), so a burst that arrives within one second does not all go to the pool that was idle. A
function with one pool never reads anything: its queue is fixed.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import structlog

from gpufleet.registry import inventory
from gpufleet.registry.keyspace import priority_scores
from gpufleet.registry.messages import DEFAULT_PRIORITY, PRIORITY_STEPS, parse_queue, queue_name, queue_version
from gpufleet.scheduling.estimate import FleetView, PoolState, RecentMeans

if TYPE_CHECKING:
    from collections.abc import Iterable

    from gpufleet.functions import Function
    from gpufleet.registry.model import EnvelopeFor
    from gpufleet.registry.store import Registry


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


log = structlog.get_logger("gpufleet.scheduling.placement")

REFRESH_S = 1.0
# A GPU whose host has not refreshed the inventory for this long (three of its 2 s refreshes) counts as gone: no task
# is placed there, and what waits there is handed over (the inventory itself marks it stale only after 30 s).
LIVE_S = 6.0
HAND_OVER_MAX = 200  # tasks moved per pool and function per round
MIN_RECENT = 5  # finished tasks that make a recent mean duration
DEFAULT_DURATION_S = 1.0  # a function that never finished a task here


Key = tuple[str, str, str | None, int]  # (function, pool, version or None: the function's own queue, priority)
# How often intake reads the inventory again to know the fleet's largest GPUs (see Placer.too_big).
SIZES_REFRESH_S = 5.0


class Placer:
    def __init__(
        self,
        registry: Registry,
        functions: Iterable[Function],
        reserve_after_s: float = 30.0,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.registry = registry
        self.functions = [fn for fn in functions if len(fn.gpu.pools) > 1]
        self.reserve_after_s = reserve_after_s  # the workers' (see estimate: a task of several GPUs)
        self.prefix = registry.prefix
        self.refresh_s = refresh_s
        self._lock = threading.Lock()  # the API places from several threads
        self._read_at = -refresh_s
        self._view = FleetView(self.prefix)  # the fleet as last read: its live GPUs
        self._hosts: list[dict[str, Any]] = []  # its GPUs up or restarting: a queue one reads is hosted
        self._states: dict[Key, PoolState] = {}  # worked out on first use after each refresh, then counted up
        self._means = RecentMeans()
        self._sizes_at = -SIZES_REFRESH_S
        self._sizes: list[dict[str, Any]] = []  # every GPU reported in the last hour, live or not

    def too_big(self, fn: Function) -> str | None:
        """Why no GPU of the fleet can ever hold a task of ``fn`` (its ``memory_gb``), or None. The fleet is every
        GPU reported in the last hour (the inventory forgets a host gone longer) in the function's pools and of its
        model: a pool where none was reported, or where a virtual GPU (its memory unknown) serves, may hold it."""
        need = fn.gpu.memory_mb
        if need is None:
            return None
        with self._lock:
            if time.monotonic() - self._sizes_at >= SIZES_REFRESH_S:
                try:
                    self._sizes = inventory.gpus(self.registry)  # stale ones too: a GPU the fleet had lately
                except Exception as exc:  # noqa: BLE001 - without a view, nothing is refused for its size
                    log.warning(
                        "cannot read the GPU inventory; tasks are not checked against GPU sizes", error=str(exc)
                    )
                self._sizes_at = time.monotonic()
            model = fn.gpu.model.lower()
            seen = [
                e
                for e in self._sizes
                if set(e.get("pools", [])) & set(fn.gpu.pools) and model in ("any", str(e.get("model", "")).lower())
            ]
        if not seen or any(e.get("virtual") or not e.get("memory_total_mb") for e in seen):
            return None
        largest = max(seen, key=lambda e: int(e["memory_total_mb"]))
        if int(largest["memory_total_mb"]) >= need:
            return None
        return (
            f"{fn.name} needs {need} MiB of GPU memory (memory_gb={fn.gpu.memory_gb:g}); the largest GPU in its pools "
            f"{list(fn.gpu.pools)} ({fn.gpu.model}) has {largest['memory_total_mb']} MiB ({largest.get('name')})"
        )

    def queue_for(
        self, fn: Function, version: str | None = None, priority: int = DEFAULT_PRIORITY
    ) -> tuple[str, Placement | None]:
        """The queue for one new task of ``fn`` (of ``version``, if one was asked for, at ``priority``), and the
        placement it came from (None: one pool, nothing to choose). A version's task is placed from the pools' slots
        that serve that version: a pool where only other versions run has no live worker for it."""
        if len(fn.gpu.pools) == 1:
            return queue_name(self.prefix, fn.gpu.pools[0], fn.gpu.model, fn.name, version), None
        with self._lock:
            if time.monotonic() - self._read_at >= self.refresh_s:
                self._refresh()
            chosen = self._place(fn, version, priority)
        return queue_name(self.prefix, chosen.pool, fn.gpu.model, fn.name, version), chosen

    def _place(self, fn: Function, version: str | None, priority: int = DEFAULT_PRIORITY) -> Placement:
        """Place one task (under the lock), and count it in the chosen pool until the next refresh."""
        states = {pool: self._state(fn, pool, version, priority) for pool in fn.gpu.pools}
        chosen = place(fn.gpu.pools, states, fn.gpu.max_queue_wait_s)
        models = sorted({str(e.get("model", "")) for e in self._view.entries})
        # Counted at every priority it is ahead of: its own and the lower ones.
        for level in range(priority + 1):
            state = self._state(fn, chosen.pool, version, level)
            self._states[fn.name, chosen.pool, version, level] = state.plus(self._view.duration(fn.name, models))
        return chosen

    def _refresh(self) -> None:
        try:
            running = self.registry.running("worker", "started_at", "function")
            held = inventory.running(self.registry, running)
            fresh = [e for e in inventory.gpus(self.registry, LIVE_S, seen_running=held) if not e["stale"]]
            entries = [e for e in fresh if e.get("up")]
            queues = sorted({q for e in entries for q in e.get("queues", [])})
            pipe = self.registry.pipeline()
            for queue in queues:
                for priority in PRIORITY_STEPS:
                    pipe.zcount(self.registry.keys.pending(queue), *priority_scores(priority))
            pipe.hgetall(self.registry.keys.metric("gpu_time"))
            *counts, gpu_time = pipe.execute()
        except Exception as exc:  # noqa: BLE001 - no view of the pools: keep the last one, and say so
            log.warning("cannot read the pools for placement; using the last view", error=str(exc))
            self._read_at = time.monotonic()
            return
        self._read_at = time.monotonic()
        self._hosts = fresh
        steps = len(PRIORITY_STEPS)
        self._view = FleetView(
            self.prefix,
            entries,
            {q: counts[i * steps : (i + 1) * steps] for i, q in enumerate(queues)},
            self._means.update(gpu_time),
            {w.decode(): (f.decode(), float(t or 0)) for _, (w, t, f) in running if w and f},
            time.time(),
            {fn.name: fn.gpu.count for fn in self.functions if fn.gpu.count > 1},
            self.reserve_after_s,
        )
        self._states = {}

    def hand_over(self, envelope_for: EnvelopeFor) -> int:
        """Move what waits in a pool where no host serves its function (or its version) any more (none has refreshed
        the inventory for ``LIVE_S``) to the pool the policy picks now (a live one, or none: then it stays). A host
        whose GPU worker is restarting still serves: its tasks wait for it. Any number of processes may run this at
        once: each move is checked in Redis (``MOVE_QUEUED``). Returns how many tasks moved."""
        moved = 0
        with self._lock:
            self._refresh()
            versions: dict[str, set[str]] = {}  # function -> the versions tasks were queued for
            for queue in self.registry.queues():
                parsed, version = parse_queue(self.prefix, queue), queue_version(queue)
                if parsed is not None and parsed[2] is not None and version is not None:
                    versions.setdefault(parsed[2], set()).add(version)
            for fn in self.functions:
                for version in [None, *sorted(versions.get(fn.name, ()))]:
                    for pool in fn.gpu.pools:
                        queue = queue_name(self.prefix, pool, fn.gpu.model, fn.name, version)
                        if any(queue in e.get("queues", []) for e in self._hosts):
                            continue  # hosted, up or restarting
                        head: list[bytes] = self.registry.client.zrange(  # type: ignore[assignment]
                            self.registry.keys.pending(queue), 0, HAND_OVER_MAX - 1
                        )
                        waiting = [i.decode() for i in head]
                        if waiting:
                            moved += self._move(fn, version, pool, waiting, envelope_for)
        return moved

    def _move(
        self,
        fn: Function,
        version: str | None,
        pool: str,
        waiting: list[str],
        envelope_for: EnvelopeFor,
    ) -> int:
        targets: dict[str, list[str]] = {}
        for task_id in waiting:
            chosen = self._place(fn, version)
            if chosen.pool == pool:  # no live pool anywhere: it waits where it is
                return 0
            targets.setdefault(chosen.pool, []).append(task_id)
        moved = 0
        for to, ids in targets.items():
            n = self.registry.move_queued(
                ids,
                queue_name(self.prefix, pool, fn.gpu.model, fn.name, version),
                queue_name(self.prefix, to, fn.gpu.model, fn.name, version),
                envelope_for,
                (pool, to),
            )
            log.info(
                "tasks handed over: no live worker in their pool",
                function=fn.name,
                version=version,
                from_pool=pool,
                to_pool=to,
                count=n,
            )
            moved += n
        return moved

    def _state(self, fn: Function, pool: str, version: str | None, priority: int) -> PoolState:
        """The pool as a new task of ``fn`` (of ``version``, at ``priority``) sees it, worked out once a reading."""
        key = (fn.name, pool, version, priority)
        if key not in self._states:
            queue = queue_name(self.prefix, pool, fn.gpu.model, fn.name, version)
            self._states[key] = self._view.state(queue, fn.gpu.memory_mb, priority)
        return self._states[key]
