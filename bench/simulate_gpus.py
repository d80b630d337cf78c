"""Tasks of 4 GPUs among tasks of one, at a scale no test here reaches: the sharing rules of gpufleet.worker.holds
(``hold.lua``), in simulated time, with and without the reservation that keeps a 4-GPU task from starving.

    .venv/bin/python bench/simulate_gpus.py [--seed N] [--seeds K] [--minutes M] [--load L]

150 hosts of 8 GPUs (1,200), each GPU a one-GPU worker and each aligned quad (0-3, 4-7) a 4-GPU worker. 10 % of the
tasks need 4 GPUs (4 s each, on average), the rest one (2 s), their run times varying by ``--cv``; they arrive as
Poisson streams at ``--load`` of the GPUs' capacity. What is simulated, as the workers do it:

- a one-GPU worker takes the oldest one-GPU task while no 4-GPU worker holds its GPU or has a matured reservation on
  it; it polls at once, so a GPU that frees goes to a waiting one-GPU task first (backfill), and of the idle ones, the
  one idle longest takes the next (Redis serves the longest-blocked BRPOP first);
- a 4-GPU worker takes the oldest 4-GPU task when its 4 GPUs are all free, and keeps them for its next 4-GPU task;
- while 4-GPU tasks wait, idle 4-GPU workers take tickets, as many as tasks wait (the first to ask: here, at
  random), and reserve their GPUs; a reservation matures after ``reserve_after_s``, and then those GPUs take no new
  one-GPU task; tickets lapse once no 4-GPU task waits;
- "no reservation": the same, with reservations that never mature.

Each 4-GPU task's estimate is what gpufleet's placer computes at its arrival (gpufleet.scheduling.estimate:
``group_ready_s`` per quad, ``gang_wait_s`` over them), from mean durations, not the true ones. Printed: the waits of
each kind, the 4-GPU tasks' estimates and the share that waited past twice theirs (and a second), and the GPUs' busy
share while work waits, per policy, as the mean over the seeds and their range.
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

from gpufleet.scheduling.estimate import gang_wait_s, group_ready_s  # after the path: it runs from a checkout

HOSTS, PER_HOST, QUAD = 150, 8, 4
GPUS, GROUPS = HOSTS * PER_HOST, HOSTS * PER_HOST // QUAD
MEAN_ONE_S, MEAN_QUAD_S, QUAD_SHARE = 2.0, 4.0, 0.10
RESERVE_AFTER_S = 30.0  # worker.reserve_after_s's default
CV = 0.5  # inference on a fixed model varies little; --cv 1 for exponential run times, the worst case for estimates
LATE_S = 1.0  # a 4-GPU task is late when it waits past twice its estimate and this (what a user reads in seconds)
POLICIES = {"reservation": RESERVE_AFTER_S, "no reservation": float("inf")}


@dataclass
class Task:
    gpus: int
    arrived: float
    duration: float
    estimate: float = 0.0
    started: float | None = None


def arrivals(seed: int, end: float, load: float, cv: float = CV) -> list[Task]:
    """Both kinds, drawn from ``seed`` alone: each policy runs the same tasks. Durations are gamma-distributed
    around their mean with coefficient of variation ``cv`` (1: exponential)."""
    shape = 1 / cv**2
    rng = random.Random(seed)
    per_task = (1 - QUAD_SHARE) * MEAN_ONE_S + QUAD_SHARE * QUAD * MEAN_QUAD_S  # GPU-seconds
    rate, t, tasks = load * GPUS / per_task, 0.0, list[Task]()
    while True:
        t += rng.expovariate(rate)
        if t >= end:
            return tasks
        quad = rng.random() < QUAD_SHARE
        mean = MEAN_QUAD_S if quad else MEAN_ONE_S
        tasks.append(Task(QUAD if quad else 1, t, rng.gammavariate(shape, mean / shape)))


@dataclass
class Sim:
    reserve_after_s: float
    tasks: list[Task]
    end: float
    rng: random.Random
    events: list[tuple[float, int, str, int]] = field(default_factory=list)
    one: deque[Task] = field(default_factory=deque)  # waiting one-GPU tasks, oldest first
    quad: deque[Task] = field(default_factory=deque)
    gpu_task: list[Task | None] = field(default_factory=lambda: [None] * GPUS)
    group_task: list[Task | None] = field(default_factory=lambda: [None] * GROUPS)
    ticket: dict[int, float] = field(default_factory=dict)  # group -> when its reservation began
    # GPUs a one-GPU task may take now, the longest idle first: Redis hands a message to the client that has waited
    # longest in BRPOP, so the one-GPU worker idle longest takes the next task.
    takeable: dict[int, None] = field(default_factory=lambda: dict.fromkeys(range(GPUS)))
    free: list[int] = field(default_factory=lambda: [QUAD] * GROUPS)  # each quad's GPUs that run nothing
    whole: set[int] = field(default_factory=lambda: set(range(GROUPS)))  # quads that run nothing at all
    seq: int = 0
    last: float = 0.0
    busy_while_waiting: float = 0.0  # GPU-seconds busy while a task waited, within the arrival window
    capacity_while_waiting: float = 0.0
    busy: int = 0

    def push(self, at: float, kind: str, what: int) -> None:
        self.seq += 1
        heapq.heappush(self.events, (at, self.seq, kind, what))

    def run(self) -> Sim:
        for i, task in enumerate(self.tasks):
            self.push(task.arrived, "arrive", i)
        while self.events:
            now, _, kind, what = heapq.heappop(self.events)
            self._count(now)
            getattr(self, f"_{kind}")(now, what)
            self._dispatch(now)
        return self

    def _count(self, now: float) -> None:
        span = max(0.0, min(now, self.end) - min(self.last, self.end))
        if span and (self.one or self.quad):
            self.busy_while_waiting += self.busy * span
            self.capacity_while_waiting += GPUS * span
        self.last = now

    def _arrive(self, now: float, i: int) -> None:
        task = self.tasks[i] = Task(self.tasks[i].gpus, now, self.tasks[i].duration)
        if task.gpus == 1:
            self.one.append(task)
        else:
            task.estimate = self.estimate(now)
            self.quad.append(task)

    def estimate(self, now: float) -> float:
        """What the placer would say of a new 4-GPU task (see gpufleet.scheduling.estimate), from mean durations."""
        ready = []
        for g in range(GROUPS):
            own = self.group_task[g]
            if own is not None:  # it goes on with the next 4-GPU task
                ready.append(max(0.0, MEAN_QUAD_S - (now - (own.started or now))))
                continue
            left = [self._left(self.gpu_task[gpu], now) for gpu in self.members(g)]
            backfilled = True  # one-GPU tasks keep coming: a GPU that frees is taken before its group is whole
            ready.append(group_ready_s(left, backfilled, self.reserve_after_s, MEAN_ONE_S))
        return gang_wait_s(ready, len(self.quad), MEAN_QUAD_S)

    @staticmethod
    def _left(task: Task | None, now: float) -> float:
        return 0.0 if task is None else max(0.0, MEAN_ONE_S - (now - (task.started or now)))

    @staticmethod
    def members(group: int) -> range:
        return range(group * QUAD, group * QUAD + QUAD)

    def matured(self, group: int, now: float) -> bool:
        since = self.ticket.get(group)
        return since is not None and now - since >= self.reserve_after_s

    def _finish_one(self, now: float, gpu: int) -> None:
        group = gpu // QUAD
        self.gpu_task[gpu] = None
        self.busy -= 1
        self.free[group] += 1
        if self.free[group] == QUAD:
            self.whole.add(group)
        if not self.matured(group, now):
            self.takeable[gpu] = None

    def _finish_quad(self, now: float, group: int) -> None:
        self.group_task[group] = None
        self.busy -= QUAD
        if self.quad:  # it keeps its GPUs for its next task
            self._start_quad(now, group)
        else:
            self.whole.add(group)
            self.takeable.update(dict.fromkeys(self.members(group)))

    def _mature(self, now: float, group: int) -> None:
        if self.matured(group, now):
            for gpu in self.members(group):
                self.takeable.pop(gpu, None)

    def _start_quad(self, now: float, group: int) -> None:
        task = self.quad.popleft()
        task.started = now
        self.group_task[group] = task
        self.ticket.pop(group, None)
        self.whole.discard(group)
        for gpu in self.members(group):
            self.takeable.pop(gpu, None)
        self.busy += QUAD
        self.push(now + task.duration, "finish_quad", group)

    def _dispatch(self, now: float) -> None:
        # One-GPU workers poll at once: a GPU that frees goes to a waiting one-GPU task first (backfill).
        while self.one and self.takeable:
            gpu = next(iter(self.takeable))
            del self.takeable[gpu]
            task = self.one.popleft()
            task.started = now
            self.gpu_task[gpu] = task
            self.busy += 1
            self.free[gpu // QUAD] -= 1
            self.whole.discard(gpu // QUAD)
            self.push(now + task.duration, "finish_one", gpu)
        while self.quad and self.whole:  # a quad that runs nothing takes the oldest 4-GPU task
            self._start_quad(now, self.whole.pop())
        if not self.quad:
            if self.ticket:  # nothing waits: the reservations lapse
                for group in self.ticket:
                    self.takeable.update(dict.fromkeys(g for g in self.members(group) if self.gpu_task[g] is None))
                self.ticket.clear()
            return
        if len(self.ticket) < len(self.quad):  # idle quad workers take tickets, as many as tasks wait
            idle = [g for g in range(GROUPS) if self.group_task[g] is None and g not in self.ticket]
            for g in self.rng.sample(idle, min(len(idle), len(self.quad) - len(self.ticket))):
                self.ticket[g] = now
                if self.reserve_after_s != float("inf"):
                    self.push(now + self.reserve_after_s, "mature", g)


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else 0.0


def spread(values: list[float], fmt: str = "{:.1f}") -> str:
    mean, low, high = (fmt.format(v) for v in (statistics.fmean(values), min(values), max(values)))
    return mean if low == high else f"{mean} ({low} to {high})"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=7, help="the first seed (default 7)")
    parser.add_argument("--seeds", type=int, default=3, help="how many seeds, from --seed (default 3)")
    parser.add_argument("--minutes", type=float, default=10.0, help="simulated minutes of arrivals (default 10)")
    parser.add_argument("--cv", type=float, default=CV, help=f"run times' coefficient of variation (default {CV})")
    parser.add_argument("--load", type=float, action="append", help="offered GPU-seconds over capacity (default: "
                        "0.95, busy; and 1.05, more than the GPUs can do, as in a burst)")  # fmt: skip
    args = parser.parse_args()
    seeds, end = list(range(args.seed, args.seed + args.seeds)), args.minutes * 60
    print(f"Simulated {args.minutes:g} min, seeds {seeds[0]}..{seeds[-1]}: {HOSTS} hosts x {PER_HOST} GPUs; "
          f"{QUAD_SHARE:.0%} of tasks need {QUAD} GPUs ({MEAN_QUAD_S:g} s), the rest one ({MEAN_ONE_S:g} s); "
          f"reserve_after_s {RESERVE_AFTER_S:g}. Each figure: the mean over the seeds (their range).")  # fmt: skip
    for load in args.load or [0.95, 1.05]:
        print(f"\n**load {load:.0%}**\n\n| policy | 4-GPU wait p50 (s) | p95 | their estimate, p95 | waited past 2x "
              "their estimate + 1 s | 1-GPU wait p95 | GPUs busy while work waits |")  # fmt: skip
        print("|---|---|---|---|---|---|---|")
        for policy, f in figures(seeds, end, load, args.cv).items():
            cells = [spread(f["quad p50"]), spread(f["quad p95"]), spread(f["estimate p95"])]
            cells += [spread(f["late"], "{:.1%}"), spread(f["one p95"]), spread(f["busy"], "{:.1%}")]
            print(f"| {policy} | " + " | ".join(cells) + " |")
    return 0


def figures(seeds: list[int], end: float, load: float, cv: float) -> dict[str, dict[str, list[float]]]:
    """Each policy's figures, one per seed, on the same arrivals."""
    rows: dict[str, dict[str, list[float]]] = {p: {} for p in POLICIES}
    for seed in seeds:
        tasks = arrivals(seed, end, load, cv)
        for policy, reserve in POLICIES.items():
            sim = Sim(reserve, list(tasks), end, random.Random(seed)).run()
            quads = [t for t in sim.tasks if t.gpus == QUAD]
            ones = [t for t in sim.tasks if t.gpus == 1]
            waits = [(t.started or sim.last) - t.arrived for t in quads]
            values = {
                "quad p50": percentile(waits, 0.5), "quad p95": percentile(waits, 0.95),
                "estimate p95": percentile([t.estimate for t in quads], 0.95),
                "late": sum(w > 2 * t.estimate + LATE_S for w, t in zip(waits, quads, strict=True)) / len(quads),
                "one p95": percentile([(t.started or sim.last) - t.arrived for t in ones], 0.95),
                "busy": sim.busy_while_waiting / max(sim.capacity_while_waiting, 1e-9),
            }  # fmt: skip
            for name, value in values.items():
                rows[policy].setdefault(name, []).append(value)
    return rows


if __name__ == "__main__":
    sys.exit(main())
