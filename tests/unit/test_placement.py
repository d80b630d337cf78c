"""The overflow policy (gpufleet.scheduling.placement): the rule on chosen cases, then its properties on generated
pools."""

from __future__ import annotations

import math
import random
import sys
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.registry.keyspace import US
from gpufleet.scheduling.estimate import (
    DEFAULT_DURATION_S,
    FleetView,
    PoolState,
    RecentMeans,
    gang_wait_s,
    group_ready_s,
)
from gpufleet.scheduling.placement import Placement, place

POOLS = ("eu", "us", "ap")


def test_the_first_pool_with_a_live_worker_and_a_short_enough_wait() -> None:
    states = {"eu": PoolState(slots=2, idle=1), "us": PoolState(slots=8, idle=8)}
    assert place(POOLS, states, max_queue_wait_s=5) == Placement("eu", overflowed=False, wait_s=0.0)


def test_a_pool_whose_wait_passes_the_limit_overflows_to_the_next() -> None:
    states = {"eu": PoolState(slots=2, idle=0, queued=10, queued_work_s=20.0), "us": PoolState(slots=1, idle=0,
              queued=2, queued_work_s=3.0)}  # fmt: skip
    assert place(POOLS, states, max_queue_wait_s=5) == Placement("us", overflowed=True, wait_s=3.0)
    assert place(POOLS, states, max_queue_wait_s=None).pool == "eu"  # no limit: the first live pool


def test_when_no_pool_qualifies_the_shortest_wait_wins_and_a_tie_goes_to_the_earlier() -> None:
    states = {"eu": PoolState(1, 0, 9, 90.0), "us": PoolState(1, 0, 4, 40.0), "ap": PoolState(2, 0, 8, 80.0)}
    assert place(POOLS, states, max_queue_wait_s=5) == Placement("us", overflowed=True, wait_s=40.0)
    states["eu"] = PoolState(1, 0, 4, 40.0)
    assert place(POOLS, states, max_queue_wait_s=5).pool == "eu"


def test_a_pool_without_a_live_worker_is_passed_over_and_with_none_anywhere_the_first_keeps_it() -> None:
    assert place(POOLS, {"us": PoolState(1, 0, 50, 500.0)}, max_queue_wait_s=5).pool == "us"
    nowhere = place(POOLS, {}, max_queue_wait_s=5)
    assert nowhere == Placement("eu", overflowed=False, wait_s=math.inf)


def test_a_burst_fills_the_first_pool_up_to_the_limit_then_overflows() -> None:
    states = {"eu": PoolState(slots=2, idle=2), "us": PoolState(slots=4, idle=4)}
    placed = []
    for _ in range(40):  # 1 s tasks and a 5 s limit
        p = place(POOLS, states, max_queue_wait_s=5)
        states[p.pool] = states[p.pool].plus(1.0)
        placed.append(p.pool)
    # eu until its estimate passes 5 s (10 queued seconds on 2 slots), then us until its own does (20 on 4), then
    # whichever waits less: the two estimates stay within one task of each other.
    assert placed[:11] == ["eu"] * 11 and placed[11:32] == ["us"] * 21
    assert abs(states["eu"].wait_s() - states["us"].wait_s()) <= 0.5


def test_a_function_has_at_least_one_pool() -> None:
    with pytest.raises(ValueError, match="at least one pool"):
        place((), {}, 5)


states_st = st.builds(PoolState, slots=st.integers(0, 8), idle=st.integers(0, 8), queued=st.integers(0, 100),
                      queued_work_s=st.floats(0, 1000))  # fmt: skip


@given(st.dictionaries(st.sampled_from(POOLS), states_st), st.one_of(st.none(), st.floats(0, 100)))
def test_the_rule_holds_for_any_pools(states: dict[str, PoolState], limit: float | None) -> None:
    p = place(POOLS, states, limit)
    waits = [states.get(pool, PoolState()).wait_s() for pool in POOLS]
    i = POOLS.index(p.pool)
    assert p.wait_s == waits[i] and p.overflowed == (i != 0)
    bound = math.inf if limit is None else limit
    qualifying = [j for j, w in enumerate(waits) if w <= bound and w != math.inf]
    if qualifying:
        assert i == qualifying[0]  # the first that qualifies, never a later one
    elif any(w != math.inf for w in waits):
        assert waits[i] == min(waits) and i == waits.index(min(waits))  # the shortest wait, the earlier on a tie
    else:
        assert i == 0  # no live worker anywhere: the preferred pool's queue keeps it


def bench_module(name: str) -> Any:
    """``bench/<name>.py``, imported as a module."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location(f"bench_{name}", Path(__file__).parents[2] / "bench" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_the_simulator_runs_the_policy_between_its_bounds_on_arrivals_its_seed_draws() -> None:
    simulate = bench_module("simulate")
    end = 60.0
    tasks = simulate.arrivals(3, end, (24.0, 36.0))
    assert tasks == simulate.arrivals(3, end, (24.0, 36.0)) != simulate.arrivals(4, end, (24.0, 36.0))
    for outage in None, (30.0, 42.0):
        runs = {p: simulate.Sim(p, tasks, end, outage).run() for p in simulate.POLICIES}
        assert {len(sim.waits()) for sim in runs.values()} == {len(tasks)}  # every task run once, by each policy
        p99 = {p: simulate.percentile(sim.waits(), 0.99) for p, sim in runs.items()}
        assert p99["work-conserving"] <= p99["overflow"] < p99["first pool"], p99
        wasted = {p: sim.wasted_s for p, sim in runs.items()}
        assert wasted["work-conserving"] <= wasted["overflow"] < wasted["first pool"], wasted
        assert runs["first pool"].overflowed == 0 < runs["overflow"].overflowed
    figures = simulate.scenario("outage", [3, 4], 0.5)
    assert len(figures["overflow"].p99) == 2 and "| work-conserving |" in simulate.report("outage", figures)


def gpu(worker: str, model: str, queues: list[str], **memory: int) -> dict[str, object]:
    return {"worker": worker, "model": model, "queues": queues, **memory}


def waiting(view: FleetView, queue: str, priority: int = 4, need_mb: int | None = None) -> float:
    return view.state(queue, need_mb, priority).wait_s()


def levels(**by_priority: int) -> list[int]:
    """Tasks queued at each priority 0..9: levels(p4=3) is three at priority 4."""
    return [by_priority.get(f"p{p}", 0) for p in range(10)]


def test_a_gpu_in_two_pools_counts_once_and_its_other_pools_work_delays_it() -> None:
    """gpu0 serves eu and us; gpu1 only us. Ten tasks wait in us: half of them are gpu0's to run, so an eu task
    waits behind five, where counting gpu0 in each pool made eu look idle."""
    entries = [gpu("gpu0@a", "H100", ["g.eu.any.f", "g.us.any.f"]), gpu("gpu1@b", "H100", ["g.us.any.f"])]
    view = FleetView("g", entries, {"g.us.any.f": levels(p4=10)}, {("f", "H100"): 2.0})
    eu = view.state("g.eu.any.f", None, 4)
    assert (eu.slots, eu.idle, eu.queued, eu.queued_work_s) == (1, 1, 5.0, 10.0)
    assert eu.wait_s() == 10.0
    assert waiting(view, "g.us.any.f") == 10.0  # ten tasks of 2 s on two GPUs


def test_a_task_waits_only_behind_its_priority_and_higher() -> None:
    view = FleetView("g", [gpu("gpu0@a", "H100", ["g.eu.any.f"])], {"g.eu.any.f": levels(p2=6, p7=1)},
                     {("f", "H100"): 1.0}, {"gpu0@a": ("f", 100.0)}, now=100.5)  # fmt: skip
    assert waiting(view, "g.eu.any.f", priority=8) == 0.5  # nothing ahead: what the running task has left
    assert waiting(view, "g.eu.any.f", priority=7) == 1.5
    assert waiting(view, "g.eu.any.f", priority=0) == 7.5


def test_the_running_tasks_count_what_they_have_left_at_their_measured_time_on_that_model() -> None:
    entries = [gpu("gpu0@a", "L4", ["g.eu.any.f"]), gpu("gpu1@a", "H100", ["g.eu.any.f"])]
    running = {"gpu0@a": ("f", 996.0), "gpu1@a": ("f", 999.0)}
    view = FleetView("g", entries, {}, {("f", "L4"): 8.0, ("f", "H100"): 2.0}, running, now=1000.0)
    state = view.state("g.eu.any.f", None, 4)
    assert (state.idle, state.queued_work_s) == (0, 4.0 + 1.0)  # 8 - 4 s on the L4, 2 - 1 s on the H100
    assert state.wait_s() == 2.5
    overdue = FleetView("g", entries, {}, {("f", "L4"): 8.0, ("f", "H100"): 2.0}, running, now=2000.0)
    assert overdue.state("g.eu.any.f", None, 4).queued_work_s == 0.0  # past its mean: about to finish


def test_a_function_never_measured_on_a_model_takes_its_time_elsewhere_then_the_fleets_typical_task() -> None:
    view = FleetView("g", means={("f", "H100"): 4.0, ("g", "L4"): 10.0, ("h", "L4"): 2.0})
    assert view.duration("f", ["H100"]) == 4.0
    assert view.duration("f", ["L4"]) == 4.0  # measured on another model only
    assert view.duration("new", ["L4"]) == (4.0 + 10.0 + 2.0) / 3  # never run: the typical task, not 1 s
    assert FleetView("g").duration("new", ["L4"]) == DEFAULT_DURATION_S  # nothing ever ran


def test_a_gpu_without_room_for_the_task_does_not_count() -> None:
    full = gpu("gpu0@a", "H100", ["g.eu.any.f"], memory_total_mb=81920, memory_others_mb=70000)
    roomy = gpu("gpu1@a", "H100", ["g.eu.any.f"], memory_total_mb=81920, memory_others_mb=0)
    assert FleetView("g", [full]).state("g.eu.any.f", 20480, 4).slots == 0
    assert FleetView("g", [full, roomy]).state("g.eu.any.f", 20480, 4).slots == 1
    assert FleetView("g", [full]).state("g.eu.any.f", None, 4).slots == 1


def test_recent_means_follow_the_last_readings_that_saw_enough_tasks() -> None:
    means = RecentMeans()

    def raw(us: int, n: int) -> dict[bytes, bytes]:
        return {f"f{US}H100{US}eu{US}us".encode(): str(us).encode(), f"f{US}H100{US}eu{US}n".encode(): str(n).encode()}

    assert means.update(raw(2_000_000, 2)) == {("f", "H100"): 1.0}  # too few for a recent mean: all time
    assert means.update(raw(12_000_000, 7)) == {("f", "H100"): 12 / 7}  # enough: the mean of all 7
    assert means.update(raw(22_000_000, 12)) == {("f", "H100"): 2.0}  # 5 more tasks, 10 s: 2 s each
    assert means.update(raw(23_000_000, 13)) == {("f", "H100"): 2.0}  # one more: not enough to move it


def test_a_task_of_several_gpus_waits_for_one_of_their_groups_whole() -> None:
    assert group_ready_s([0, 0], True, 30, 2) == 0  # idle: at once
    assert group_ready_s([3, 1], False, 30, 2) == 3  # no one-GPU task takes the first to free: when the last ends
    assert group_ready_s([3, 1, 0, 0], True, 30, 2) == 30 + 2 * (1 + 1 / 2 + 1 / 3 + 1 / 4)  # reserved, then drained
    assert group_ready_s([40, 1], True, 30, 2) == 40
    assert gang_wait_s([5.0, 1.0], 0, 4.0) == 1.0 and gang_wait_s([5.0, 1.0], 2, 4.0) == 5.0  # 1, then 5 and 5
    assert gang_wait_s([], 0, 4.0) == math.inf
    pair = {**gpu("gpu0-1@a", "H100", ["g.p.any.pair"]), "gang": ["gpu0", "gpu1"]}
    singles = [gpu(f"gpu{i}@a", "H100", ["g.p.any.single"]) for i in range(2)]
    means = {("pair", "H100"): 8.0, ("single", "H100"): 2.0}  # pair's is GPU time: 4 s on its 2 GPUs
    queued = {"g.p.any.pair": levels(p4=2)}

    def view(running: dict[str, tuple[str, float]]) -> FleetView:
        return FleetView("g", [*singles, pair], queued, means, running, 1000.0, {"pair": 2}, 30)

    assert view({}).duration("pair", ["H100"]) == 4.0
    assert view({}).state("g.p.any.pair", None, 4) == PoolState(1, 1, 2, 8.0)  # whole: 2 ahead of 4 s each
    busy = view({"gpu0@a": ("single", 999.0)})  # 1 s left, and more one-GPU tasks to come: reserved first
    assert busy.state("g.p.any.pair", None, 4) == PoolState(1, 0, 2, 30 + 2 * 1.5 + 2 * 4.0)
    own = view({"gpu0-1@a": ("pair", 998.0)})  # its own task has 2 s left, then it goes on with the next
    assert own.state("g.p.any.pair", None, 4) == PoolState(1, 0, 2, 2.0 + 2 * 4.0)


def test_the_gpu_simulator_runs_every_task_and_the_reservation_keeps_4_gpu_tasks_from_starving() -> None:
    simulate = bench_module("simulate_gpus")
    tasks = simulate.arrivals(3, 45.0, 1.1)
    assert tasks == simulate.arrivals(3, 45.0, 1.1) != simulate.arrivals(4, 45.0, 1.1)
    p95 = {}
    for policy, reserve in {"reservation": 5.0, "no reservation": math.inf}.items():  # 5 s: 45 s of arrivals
        sim = simulate.Sim(reserve, list(tasks), 45.0, random.Random(3)).run()
        assert all(t.started is not None for t in sim.tasks) and sim.busy == 0  # every task ran, every GPU let go
        quads = [t for t in sim.tasks if t.gpus == simulate.QUAD]
        p95[policy] = simulate.percentile([t.started - t.arrived for t in quads], 0.95)
        assert sim.busy_while_waiting / sim.capacity_while_waiting > 0.9
    assert p95["reservation"] < p95["no reservation"] / 2, p95
