"""The overflow policy at a scale no test here reaches: gpufleet.scheduling.placement.place, unchanged, in
simulated time, between the two bounds it must sit between.

    .venv/bin/python bench/simulate.py [--seed N] [--seeds K] [--minutes M]

1,200 GPUs in 3 pools of different models; three functions arrive as Poisson streams. Two scenarios, run apart:

- **burst**: from 40 % to 60 % of the run, the traffic that prefers ``eu`` doubles;
- **outage**: from 50 % to 70 % of the run, ``us`` loses every worker.

Each scenario runs its arrivals (drawn from the seed: K seeds from N) under three policies:

- **first pool**: each task in its function's first pool (no overflow: the lower bound);
- **overflow**: gpufleet's policy, :func:`place` on what intake sees;
- **work-conserving**: every GPU reads every queue it can serve, in every pool, so no GPU idles while a task it
  could run waits (the upper bound; what one global queue would give, at the cost of locality and of a reader per
  queue per GPU).

Printed per scenario, as Markdown: the queue wait's percentiles, GPU utilisation, the GPU time left idle while a
task that GPU could run waited, and the tasks placed outside their first pool: each as the mean over the seeds with
its range.

What is simulated and what is not:
- a pool's workers take the oldest queued task they can serve (its model or ``any``), one task per GPU;
- the placer sees the pools as intake would: a snapshot refreshed every ``REFRESH_S`` plus its own placements since
  (``PoolState.plus``), not the exact state; the work ahead counts what the running tasks have left;
- durations are exponential around each function's mean, and the mean the placer uses is the true one;
- an outage kills the pool's running tasks: their leases lapse and they (and, under overflow, the pool's queued
  tasks) are placed again ``HANDOVER_S`` later; under "first pool" they wait for the pool to come back.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gpufleet.scheduling.placement import PoolState, place  # after the path: it runs from a checkout

REFRESH_S = 1.0  # how often a placer reads the pools again
HANDOVER_S = 5.0  # from a pool's last worker gone to its tasks placed elsewhere
BURST = 2.0  # the eu-first traffic, times this, in the burst scenario
POLICIES = ("first pool", "overflow", "work-conserving")
SCENARIOS = ("burst", "outage")


@dataclass(frozen=True)
class Fn:
    name: str
    model: str  # a series, or "any"
    pools: tuple[str, ...]
    mean_s: float
    rate: float  # arrivals per second
    max_queue_wait_s: float


# pool -> [(model, GPUs)]
GPUS = {"eu": [("H100", 400), ("A10G", 200)], "us": [("H100", 250), ("L4", 150)], "ap": [("A10G", 200)]}
FUNCTIONS = (
    Fn("llm", "H100", ("eu", "us"), mean_s=4.0, rate=60.0, max_queue_wait_s=10.0),
    Fn("embed", "any", ("eu", "ap", "us"), mean_s=0.5, rate=400.0, max_queue_wait_s=2.0),
    Fn("ocr", "any", ("us", "ap", "eu"), mean_s=1.5, rate=150.0, max_queue_wait_s=5.0),
)


def serves(fn: Fn, model: str) -> bool:
    return fn.model in ("any", model)


@dataclass
class Task:
    fn: Fn
    arrived: float
    duration: float
    pool: str = ""  # where it waits ("" under work-conserving: everywhere it may run)
    started: float | None = None


def arrivals(seed: int, end: float, burst: tuple[float, float] | None) -> list[Task]:
    """The scenario's tasks, drawn from ``seed`` alone: every policy runs the same ones."""
    rng, tasks = random.Random(seed), []
    for fn in FUNCTIONS:
        t = 0.0
        while True:
            boost = BURST if burst and fn.pools[0] == "eu" and burst[0] <= t < burst[1] else 1.0
            t += rng.expovariate(fn.rate * boost)
            if t >= end:
                break
            tasks.append(Task(fn, t, rng.expovariate(1 / fn.mean_s)))
    return tasks


@dataclass
class Pool:
    name: str
    gpus: dict[str, int]  # model -> count
    queues: dict[str, deque[Task]]  # function -> its tasks waiting here (shared by every pool: work-conserving)
    busy: dict[str, int] = field(default_factory=dict)
    running: dict[int, tuple[Task, str]] = field(default_factory=dict)  # id(task) -> (task, model)
    up: bool = True
    busy_s: float = 0.0
    waits: list[float] = field(default_factory=list)

    def slots(self, fn: Fn) -> tuple[int, int]:
        """(live GPUs that serve fn, of those idle)."""
        if not self.up:
            return 0, 0
        models = [m for m in self.gpus if serves(fn, m)]
        total = sum(self.gpus[m] for m in models)
        return total, total - sum(self.busy.get(m, 0) for m in models)

    def state(self, fn: Fn, now: float) -> PoolState:
        """What intake's placer reads for ``fn`` here: the work ahead is the queued tasks' mean times and what the
        running ones have left, on the GPUs that would run it."""
        slots, idle = self.slots(fn)
        shared = [g for g in FUNCTIONS if any(serves(fn, m) and serves(g, m) for m in self.gpus)]
        queued = sum(len(self.queues[g.name]) for g in shared)
        left = sum(max(0.0, t.fn.mean_s - (now - (t.started or now))) for t, m in self.running.values()
                   if serves(fn, m))  # fmt: skip
        return PoolState(slots, idle, queued, sum(len(self.queues[g.name]) * g.mean_s for g in shared) + left)

    def take(self, model: str) -> Task | None:
        """The oldest waiting task a GPU of ``model`` here serves."""
        heads = [q[0] for q in self.queues.values() if q and serves(q[0].fn, model) and self.name in q[0].fn.pools]
        if not heads:
            return None
        task = min(heads, key=lambda t: t.arrived)
        self.queues[task.fn.name].popleft()
        return task


class Sim:
    def __init__(self, policy: str, tasks: list[Task], end: float, outage: tuple[float, float] | None) -> None:
        if policy not in POLICIES:
            raise ValueError(f"policy {policy!r}: one of {POLICIES}")
        self.policy, self.end, self.outage = policy, end, outage
        shared = {fn.name: deque[Task]() for fn in FUNCTIONS}
        queues: Callable[[], dict[str, deque[Task]]] = (
            (lambda: shared) if policy == "work-conserving" else (lambda: {fn.name: deque() for fn in FUNCTIONS})
        )
        self.pools = {name: Pool(name, dict(models), queues()) for name, models in GPUS.items()}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.snapshot: dict[tuple[str, str], PoolState] = {}
        self.snapshot_at = -REFRESH_S
        self.overflowed = 0
        self.wasted_s = 0.0  # GPU-seconds idle while a task that GPU could run waited (within the arrival window)
        self.last = 0.0
        self.waiting = dict.fromkeys((fn.name for fn in FUNCTIONS), 0)  # tasks not running, wherever they wait
        self.eligible = {  # (pool, model) -> the functions its GPUs could run
            (p, m): [fn.name for fn in FUNCTIONS if p in fn.pools and serves(fn, m)] for p in GPUS for m, _ in GPUS[p]
        }
        for task in tasks:
            self.push(task.arrived, "arrive", Task(task.fn, task.arrived, task.duration))
        if outage:
            self.push(outage[0], "down", "us")
            self.push(outage[1], "back", "us")

    def push(self, at: float, kind: str, data: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    def run(self) -> Sim:
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if now > self.end * 1.5:
                break
            self._waste(now)
            getattr(self, f"_{kind}")(now, data)
        return self

    def _waste(self, now: float) -> None:
        """Count the GPUs left idle since the last event while a task of a function they could run waited, in any
        queue (what a policy's choice of queue costs)."""
        span = max(0.0, min(now, self.end) - min(self.last, self.end))
        if span:
            for pool in self.pools.values():
                if pool.up:
                    for model, count in pool.gpus.items():
                        idle = count - pool.busy.get(model, 0)
                        if idle and any(self.waiting[f] for f in self.eligible[(pool.name, model)]):
                            self.wasted_s += idle * span
        self.last = now

    def _arrive(self, now: float, task: Task) -> None:
        self.waiting[task.fn.name] += 1
        self.enqueue(now, task)

    def enqueue(self, now: float, task: Task) -> None:
        fn = task.fn
        if self.policy == "work-conserving":
            self.pools[fn.pools[0]].queues[fn.name].append(task)  # the one queue every pool reads
            for name in fn.pools:  # the first pool with an idle GPU for it takes it
                self.dispatch(now, self.pools[name])
            return
        if self.policy == "overflow":
            if now - self.snapshot_at >= REFRESH_S:
                self.snapshot = {(p.name, f.name): p.state(f, now) for p in self.pools.values() for f in FUNCTIONS}
                self.snapshot_at = now
            chosen = place(fn.pools, {pool: self.snapshot[(pool, fn.name)] for pool in fn.pools}, fn.max_queue_wait_s)
            self.overflowed += chosen.overflowed
            for f in FUNCTIONS:  # every function's view of that pool takes the new task, as intake's own count would
                self.snapshot[(chosen.pool, f.name)] = self.snapshot[(chosen.pool, f.name)].plus(fn.mean_s)
            task.pool = chosen.pool
        else:
            task.pool = fn.pools[0]
        self.pools[task.pool].queues[fn.name].append(task)
        self.dispatch(now, self.pools[task.pool])

    def dispatch(self, now: float, pool: Pool) -> None:
        if not pool.up:
            return
        for model, count in pool.gpus.items():
            while pool.busy.get(model, 0) < count:
                task = pool.take(model)
                if task is None:
                    break
                pool.busy[model] = pool.busy.get(model, 0) + 1
                self.waiting[task.fn.name] -= 1
                task.started, task.pool = now, pool.name
                if pool.name != task.fn.pools[0] and self.policy == "work-conserving":
                    self.overflowed += 1
                pool.waits.append(now - task.arrived)
                pool.running[id(task)] = (task, model)
                self.push(now + task.duration, "finish", (pool.name, id(task)))

    def _finish(self, now: float, key: tuple[str, int]) -> None:
        pool = self.pools[key[0]]
        found = pool.running.pop(key[1], None)
        if found is None:  # killed by an outage
            return
        task, model = found
        pool.busy[model] -= 1
        pool.busy_s += self.busy_within(task, now)
        self.dispatch(now, pool)

    def _down(self, now: float, name: str) -> None:
        pool = self.pools[name]
        pool.up = False
        killed = [task for task, _ in pool.running.values()]
        pool.running.clear()
        pool.busy = {}
        for task in killed:
            self.waiting[task.fn.name] += 1
            pool.busy_s += self.busy_within(task, now)
            pool.waits.remove((task.started or now) - task.arrived)  # its wait counts where it finally runs
            task.started = None
        if self.policy == "first pool":  # they wait in the pool's queue for it to come back
            for task in sorted(killed, key=lambda t: t.arrived, reverse=True):
                pool.queues[task.fn.name].appendleft(task)
        else:
            self.push(now + HANDOVER_S, "handover", (name, killed))

    def busy_within(self, task: Task, now: float) -> float:
        """The part of the task's run inside the arrival window (utilisation is over that window)."""
        started = task.started if task.started is not None else now
        return max(0.0, min(now, self.end) - started)

    def _handover(self, now: float, data: tuple[str, list[Task]]) -> None:
        """Lapsed leases put the killed tasks back, oldest first; under overflow, the hand-over places them and the
        pool's queued tasks elsewhere (under work-conserving its queues are everyone's: nothing else to move)."""
        name, killed = data
        moving = list(killed)
        if self.policy == "overflow":
            pool = self.pools[name]
            moving += [t for q in pool.queues.values() for t in q]
            for q in pool.queues.values():
                q.clear()
            self.snapshot_at = -REFRESH_S  # the hand-over reads the pools afresh
        for task in sorted(moving, key=lambda t: t.arrived):
            if self.policy == "work-conserving":
                queue = self.pools[task.fn.pools[0]].queues[task.fn.name]
                queue.insert(next((i for i, t in enumerate(queue) if t.arrived > task.arrived), len(queue)), task)
            else:
                self.enqueue(now, task)
        for pool in self.pools.values():
            self.dispatch(now, pool)

    def _back(self, now: float, name: str) -> None:
        self.pools[name].up = True
        self.dispatch(now, self.pools[name])

    def waits(self) -> list[float]:
        return [w for p in self.pools.values() for w in p.waits]


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


@dataclass
class Figures:
    """One policy's figures in one scenario, per seed."""

    p50: list[float] = field(default_factory=list)
    p95: list[float] = field(default_factory=list)
    p99: list[float] = field(default_factory=list)
    mean: list[float] = field(default_factory=list)
    utilisation: list[float] = field(default_factory=list)
    wasted: list[float] = field(default_factory=list)  # share of the GPU time idle while work it could run waited
    moved: list[float] = field(default_factory=list)
    tasks: int = 0

    def add(self, sim: Sim) -> None:
        waits, gpus = sim.waits(), sum(sum(m.values()) for m in [dict(v) for v in GPUS.values()])
        for name, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
            getattr(self, name).append(percentile(waits, q))
        self.mean.append(statistics.fmean(waits))
        self.utilisation.append(sum(p.busy_s for p in sim.pools.values()) / (gpus * sim.end))
        self.wasted.append(sim.wasted_s / (gpus * sim.end))
        self.moved.append(sim.overflowed / max(len(waits), 1))
        self.tasks = len(waits)


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    """The mean over the seeds, with their range when there are several."""
    mean, low, high = (fmt.format(v) for v in (statistics.fmean(values), min(values), max(values)))
    return mean if low == high else f"{mean} ({low} to {high})"


def scenario(name: str, seeds: list[int], minutes: float) -> dict[str, Figures]:
    end = minutes * 60
    burst = (end * 0.4, end * 0.6) if name == "burst" else None
    outage = (end * 0.5, end * 0.7) if name == "outage" else None
    figures = {policy: Figures() for policy in POLICIES}
    for seed in seeds:
        tasks = arrivals(seed, end, burst)
        for policy in POLICIES:
            figures[policy].add(Sim(policy, tasks, end, outage).run())
    return figures


def report(name: str, figures: dict[str, Figures]) -> str:
    lines = [f"**{name}**", "", "| policy | wait p50 (s) | p95 | p99 | mean | GPU utilisation | idle while its work "
             "waits | outside the first pool |", "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for policy, f in figures.items():
        lines.append(f"| {policy} | {spread(f.p50)} | {spread(f.p95)} | {spread(f.p99)} | {spread(f.mean)} | "
                     f"{spread(f.utilisation, '{:.0%}')} | {spread(f.wasted, '{:.1%}')} | "
                     f"{spread(f.moved, '{:.0%}')} |")  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7, help="the first seed (default 7)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed (default 3)")
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of arrivals (default 10)")
    parser.add_argument("--scenario", choices=SCENARIOS, action="append", help="default: each")
    args = parser.parse_args()
    seeds = list(range(args.seed, args.seed + args.seeds))
    pools = ", ".join(f"{name}: " + " + ".join(f"{n} {m}" for m, n in models) for name, models in GPUS.items())
    fns = "; ".join(f"{f.name} ({f.model}, {f.mean_s:g} s, {f.rate:g}/s, pools {'>'.join(f.pools)}, max wait "
                    f"{f.max_queue_wait_s:g} s)" for f in FUNCTIONS)  # fmt: skip
    print(f"Simulated {args.minutes:g} min per run, seeds {seeds[0]}..{seeds[-1]}. GPUs: {pools}. Functions: {fns}. "
          f"Burst: eu-first traffic x{BURST:g} from 40 % to 60 % of the run; outage: us down from 50 % to 70 %. "
          "Each figure: the mean over the seeds (their range).\n")  # fmt: skip
    for name in args.scenario or SCENARIOS:
        figures = scenario(name, seeds, args.minutes)
        print(report(name, figures) + f"\n\n{figures['overflow'].tasks:,} tasks per run (the last seed).\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
