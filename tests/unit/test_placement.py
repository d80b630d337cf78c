"""The overflow policy (gpufleet.scheduling.placement): the rule on chosen cases, then its properties on generated
pools."""

from __future__ import annotations

import math
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.scheduling.placement import Placement, PoolState, place

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


def test_the_simulator_runs_the_policy_and_overflow_shortens_the_waits_of_a_burst_and_an_outage() -> None:
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[2] / "bench" / "simulate.py"
    spec = importlib.util.spec_from_file_location("bench_simulate", path)
    assert spec is not None and spec.loader is not None
    simulate = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = simulate  # dataclasses look their module up there
    spec.loader.exec_module(simulate)
    plain = simulate.Sim(overflow=False, seed=3, minutes=2).run()
    policy = simulate.Sim(overflow=True, seed=3, minutes=2).run()

    def waits(sim: object) -> list[float]:
        return [w for pool in sim.pools.values() for w in pool.waits]  # type: ignore[attr-defined]

    assert len(waits(plain)) == len(waits(policy)) > 50_000  # the same arrivals, every one run once
    assert simulate.percentile(waits(policy), 0.99) < simulate.percentile(waits(plain), 0.99) / 2
    assert plain.overflowed == 0 < policy.overflowed
    assert "| all | 1200 |" in simulate.report(plain, policy)
