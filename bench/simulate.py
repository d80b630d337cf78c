"""The overflow policy at a scale no test here reaches: gpufleet.scheduling.placement.place, unchanged, in
simulated time.

    .venv/bin/python bench/simulate.py [--seed N] [--minutes M]

1,200 GPUs in 3 pools of different models. Three functions arrive as Poisson streams; halfway through a burst
doubles the traffic that prefers ``eu``, and for a while ``us`` loses every worker. The same arrivals run twice:
each task in its function's first pool (no overflow), then placed by the policy. Printed per pool: the queue wait's
percentiles and GPU utilisation, as a Markdown table.

What is simulated and what is not:
- a pool's workers take the oldest queued task they can serve (its model or ``any``), one task per GPU;
- the placer sees the pools as intake would: a snapshot refreshed every ``REFRESH_S`` plus its own placements since
  (``PoolState.plus``), not the exact state;
- durations are exponential around each function's mean, and the mean the placer uses is the true one;
- a pool's outage kills its running tasks: they and its queued tasks are placed again ``HANDOVER_S`` later (the
  hand-over the dispatcher does), or, without overflow, wait for the pool to come back.
"""

from __future__ import annotations

import argparse
import heapq
import random
import statistics
import sys
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gpufleet.scheduling.placement import PoolState, place  # after the path: it runs from a checkout

REFRESH_S = 1.0  # how often a placer reads the pools again
HANDOVER_S = 5.0  # from a pool's last worker gone to its tasks placed elsewhere
BURST = 2.0  # the eu-first traffic, times this, from 40 % to 60 % of the run


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


@dataclass
class Task:
    fn: Fn
    arrived: float
    duration: float
    pool: str = ""
    started: float | None = None


@dataclass
class Pool:
    name: str
    gpus: dict[str, int]  # model -> count
    busy: dict[str, int] = field(default_factory=dict)
    queues: dict[str, deque[Task]] = field(default_factory=lambda: {fn.name: deque() for fn in FUNCTIONS})
    up: bool = True
    busy_s: float = 0.0
    waits: list[float] = field(default_factory=list)

    def serves(self, fn: Fn, model: str) -> bool:
        return fn.model in ("any", model)

    def slots(self, fn: Fn) -> tuple[int, int]:
        """(live GPUs that serve fn, of those idle)."""
        if not self.up:
            return 0, 0
        models = [m for m in self.gpus if self.serves(fn, m)]
        total = sum(self.gpus[m] for m in models)
        return total, total - sum(self.busy.get(m, 0) for m in models)

    def state(self, fn: Fn) -> PoolState:
        slots, idle = self.slots(fn)
        shared = [g for g in FUNCTIONS if any(self.serves(fn, m) and self.serves(g, m) for m in self.gpus)]
        queued = sum(len(self.queues[g.name]) for g in shared)
        return PoolState(slots, idle, queued, sum(len(self.queues[g.name]) * g.mean_s for g in shared))

    def take(self, model: str) -> Task | None:
        """The oldest queued task a GPU of ``model`` serves."""
        heads = [q[0] for name, q in self.queues.items() if q and self.serves(q[0].fn, model)]
        if not heads:
            return None
        task = min(heads, key=lambda t: t.arrived)
        self.queues[task.fn.name].popleft()
        return task


class Sim:
    def __init__(self, overflow: bool, seed: int, minutes: float) -> None:
        self.overflow = overflow
        self.rng = random.Random(seed)
        self.end = minutes * 60
        self.pools = {name: Pool(name, dict(models)) for name, models in GPUS.items()}
        self.events: list[tuple[float, int, str, object]] = []
        self.seq = 0
        self.running: dict[int, tuple[Task, str, str]] = {}  # task key -> (task, pool, model)
        self.snapshot: dict[tuple[str, str], PoolState] = {}
        self.snapshot_at = -REFRESH_S
        self.overflowed = 0
        self.burst = (self.end * 0.4, self.end * 0.6)
        self.outage = (self.end * 0.5, self.end * 0.7)

    def push(self, at: float, kind: str, data: object = None) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, data))

    def run(self) -> Sim:
        arrivals = random.Random(1)  # the same arrivals, with and without overflow
        for fn in FUNCTIONS:
            t = 0.0
            while t < self.end:
                boost = BURST if fn.pools[0] == "eu" and self.burst[0] <= t < self.burst[1] else 1.0
                t += arrivals.expovariate(fn.rate * boost)
                self.push(t, "arrive", Task(fn, t, arrivals.expovariate(1 / fn.mean_s)))
        self.push(self.outage[0], "down", "us")
        self.push(self.outage[1], "back", "us")
        while self.events:
            now, _, kind, data = heapq.heappop(self.events)
            if now > self.end * 1.5:
                break
            getattr(self, f"_{kind}")(now, data)
        return self

    def _arrive(self, now: float, task: Task) -> None:
        self.enqueue(now, task)

    def enqueue(self, now: float, task: Task) -> None:
        if self.overflow:
            if now - self.snapshot_at >= REFRESH_S:
                self.snapshot = {(p.name, fn.name): p.state(fn) for p in self.pools.values() for fn in FUNCTIONS}
                self.snapshot_at = now
            states = {pool: self.snapshot[(pool, task.fn.name)] for pool in task.fn.pools}
            chosen = place(task.fn.pools, states, task.fn.max_queue_wait_s)
            self.overflowed += chosen.overflowed
            # Every function's view of that pool takes the new task, as intake's own count would.
            for fn in FUNCTIONS:
                if (chosen.pool, fn.name) in self.snapshot:
                    self.snapshot[(chosen.pool, fn.name)] = self.snapshot[(chosen.pool, fn.name)].plus(task.fn.mean_s)
            task.pool = chosen.pool
        else:
            task.pool = task.fn.pools[0]
        self.pools[task.pool].queues[task.fn.name].append(task)
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
                task.started = now
                pool.waits.append(now - task.arrived)
                key = id(task)
                self.running[key] = (task, pool.name, model)
                self.push(now + task.duration, "finish", key)

    def _finish(self, now: float, key: int) -> None:
        found = self.running.pop(key, None)
        if found is None:  # killed by an outage
            return
        task, name, model = found
        pool = self.pools[name]
        pool.busy[model] -= 1
        pool.busy_s += self.busy_within(task, now)
        self.dispatch(now, pool)

    def _down(self, now: float, name: str) -> None:
        pool = self.pools[name]
        pool.up = False
        killed = [task for key, (task, p, _) in list(self.running.items()) if p == name and self.running.pop(key)]
        for task in killed:
            pool.busy_s += self.busy_within(task, now)
            pool.waits.remove((task.started or now) - task.arrived)  # its wait counts where it finally runs
            task.started = None
        pool.busy = {}
        for task in sorted(killed, key=lambda t: t.arrived, reverse=True):
            pool.queues[task.fn.name].appendleft(task)
        if self.overflow:
            self.push(now + HANDOVER_S, "handover", name)

    def busy_within(self, task: Task, now: float) -> float:
        """The part of the task's run inside the arrival window (utilisation is over that window)."""
        started = task.started if task.started is not None else now
        return max(0.0, min(now, self.end) - started)

    def _handover(self, now: float, name: str) -> None:
        pool = self.pools[name]
        moving = sorted((t for q in pool.queues.values() for t in q), key=lambda t: t.arrived)
        for q in pool.queues.values():
            q.clear()
        self.snapshot_at = -REFRESH_S  # the hand-over reads the pools afresh
        for task in moving:
            self.enqueue(now, task)

    def _back(self, now: float, name: str) -> None:
        self.pools[name].up = True
        self.dispatch(now, self.pools[name])


def percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def report(plain: Sim, policy: Sim) -> str:
    lines = ["| pool | GPUs | wait p50 / p95 / p99 (s), first pool only | with overflow | utilisation, first pool only "
             "| with overflow |", "|---|---|---|---|---|---|"]  # fmt: skip
    for name in GPUS:
        a, b = plain.pools[name], policy.pools[name]
        gpus = sum(a.gpus.values())
        span = plain.end  # utilisation over the arrival window (a busy pool keeps running after it)

        def waits(p: Pool) -> str:
            return " / ".join(f"{percentile(p.waits, q):.1f}" for q in (0.5, 0.95, 0.99)) if p.waits else "no task"

        lines.append(f"| {name} | {gpus} | {waits(a)} | {waits(b)} | {a.busy_s / (gpus * span):.2f} | "
                     f"{b.busy_s / (gpus * span):.2f} |")  # fmt: skip
    every = [w for p in plain.pools.values() for w in p.waits]
    every_b = [w for p in policy.pools.values() for w in p.waits]
    lines.append(f"| all | {sum(sum(m.values()) for m in [dict(v) for v in GPUS.values()])} | "
                 f"{' / '.join(f'{percentile(every, q):.1f}' for q in (0.5, 0.95, 0.99))} | "
                 f"{' / '.join(f'{percentile(every_b, q):.1f}' for q in (0.5, 0.95, 0.99))} | | |")  # fmt: skip
    ran = len(every_b)
    lines += ["", f"{ran:,} tasks; {policy.overflowed:,} placed outside their first pool "
              f"({policy.overflowed / max(ran, 1):.0%}); mean wait {statistics.fmean(every):.1f} s without overflow, "
              f"{statistics.fmean(every_b):.1f} s with it."]  # fmt: skip
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of arrivals (default 10)")
    args = parser.parse_args()
    plain = Sim(overflow=False, seed=args.seed, minutes=args.minutes).run()
    policy = Sim(overflow=True, seed=args.seed, minutes=args.minutes).run()
    pools = ", ".join(f"{name}: " + " + ".join(f"{n} {m}" for m, n in models) for name, models in GPUS.items())
    fns = "; ".join(f"{f.name} ({f.model}, {f.mean_s:g} s, {f.rate:g}/s, pools {'>'.join(f.pools)}, max wait "
                    f"{f.max_queue_wait_s:g} s)" for f in FUNCTIONS)  # fmt: skip
    print(f"Simulated {args.minutes:g} min. GPUs: {pools}. Functions: {fns}. Burst: eu-first traffic x{BURST:g} from "
          f"{plain.burst[0] / 60:g} to {plain.burst[1] / 60:g} min; outage: us down from {plain.outage[0] / 60:g} to "
          f"{plain.outage[1] / 60:g} min.\n")  # fmt: skip
    print(report(plain, policy))
    return 0


if __name__ == "__main__":
    sys.exit(main())
