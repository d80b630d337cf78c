"""Tasks of two GPUs beside tasks of one, on a host of 3 virtual GPUs, with real worker processes and real Redis:
a 2-GPU task runs in a process that sees both of its GPUs, takes them at once or not at all, lets 1-GPU tasks
backfill them while it waits and then reserves them, and no GPU ever runs two tasks at a time, kills included."""

from __future__ import annotations

import contextlib
import os
import random
import signal
import time
from pathlib import Path

import orjson
import psutil
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.worker.holds import Holds
from tests.harness import FleetHarness
from tests.integration.test_engine import finished

FUNCTIONS = Path(__file__).parents[1] / "functions_gpus"  # a folder of its own: other fleets have no 2-GPU function


def host(h: FleetHarness) -> str:
    return f"trio-{h.prefix}"  # the runs' list is the host's: tests run side by side on one Redis


def three_gpus(h: FleetHarness, **worker: object) -> ControlPlane:
    h.write_config(functions=[str(FUNCTIONS)])
    h.start_host(host(h), ["default"], virtual_gpus=3, **worker)
    cp = ControlPlane(h.fleet())
    h.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 4, what="3 GPU workers and the pair's up")
    return cp


def runs(h: FleetHarness) -> list[tuple[set[str], float, float, str]]:
    """Every finished run: (its GPUs, start, end, task id)."""
    out = []
    for raw in h.redis.lrange(f"occupied:{host(h)}", 0, -1):
        gpus, start, end, task = raw.decode().split()
        out.append((set(gpus.split(",")), float(start), float(end), task))
    return out


def assert_no_gpu_ran_two_at_once(h: FleetHarness) -> None:
    done = sorted(runs(h), key=lambda r: r[1])
    for i, (gpus, _, end, task) in enumerate(done):
        for other, start, _, other_task in done[i + 1 :]:
            if start >= end:
                break
            assert not gpus & other, f"{task} and {other_task} overlapped on {gpus & other}"


def test_a_two_gpu_task_sees_both_its_gpus_and_shares_them_with_one_gpu_tasks(harness: FleetHarness) -> None:
    cp = three_gpus(harness)
    pairs = [cp.invoke("pair", {"seconds": 0.3}).id for _ in range(4)]
    singles = [cp.invoke("single", {"seconds": 0.2}).id for _ in range(9)]
    done = finished(harness, cp, pairs + singles)
    assert {d["state"] for d in done} == {"SUCCEEDED"}
    for d in done[:4]:
        assert d["result"]["worker"] == f"vgpu0-1@{host(harness)}" and d["result"]["gpus"] == ["vgpu0", "vgpu1"], d
        assert d["attempts"] == 1 and d["usage"]["gpu_seconds"] >= 2 * 0.3  # two GPUs held
    assert {d["result"]["worker"] for d in done[4:]} <= {f"vgpu{i}@{host(harness)}" for i in range(3)}
    assert_no_gpu_ran_two_at_once(harness)
    assert all(harness.runs(t) == 1 for t in pairs + singles)


def test_a_waiting_two_gpu_task_is_backfilled_then_reserves_its_gpus(harness: FleetHarness) -> None:
    cp = three_gpus(harness, reserve_after_s=1)
    first = [cp.invoke("single", {"seconds": 0.3}).id for _ in range(3)]
    harness.wait_for(lambda: all(harness.runs(t) for t in first), what="every GPU busy")
    big = cp.invoke("pair", {"seconds": 0.3}).id
    flood = [cp.invoke("single", {"seconds": 0.3}).id for _ in range(45)]  # 4.5 s of work for 3 GPUs
    done = {d["id"]: d for d in finished(harness, cp, [*first, big, *flood], timeout_s=60)}
    assert {d["state"] for d in done.values()} == {"SUCCEEDED"}
    started = {task: start for _, start, _, task in runs(harness)}
    # Backfilled: 1-GPU tasks ran on its GPUs while it waited; reserved: it ran well before the flood was done.
    before = [t for t in flood if started[t] < started[big]]
    assert before and started[big] < max(started[t] for t in flood) - 1.0, (len(before), len(flood))
    assert_no_gpu_ran_two_at_once(harness)


def test_one_waiting_two_gpu_task_reserves_one_pair_of_gpus_not_every_pair(harness: FleetHarness) -> None:
    harness.write_config(functions=[str(FUNCTIONS)])
    harness.start_host(host(harness), ["default"], virtual_gpus=4, reserve_after_s=1)
    cp = ControlPlane(harness.fleet())
    harness.wait_for(lambda: len([g for g in cp.gpus() if g["up"]]) == 6, what="4 GPU workers and 2 pairs' up")
    first = [cp.invoke("single", {"seconds": 1}).id for _ in range(4)]
    harness.wait_for(lambda: all(harness.runs(t) for t in first), what="every GPU busy")
    big = cp.invoke("pair", {"seconds": 0.2}).id
    flood = [cp.invoke("single", {"seconds": 1}).id for _ in range(12)]
    key, reserving = f"{harness.prefix}:holds:{host(harness)}", []
    while not harness.runs(big):  # who reserves GPUs while it waits: its pair's worker, not the other pair's too
        now = time.time()
        fields = {k.decode(): v.decode().split() for k, v in harness.redis.hgetall(key).items()}
        reserving.append({v[0] for k, v in fields.items() if k.startswith("r") and now - float(v[2]) < 2})
        time.sleep(0.05)
    assert max(len(r) for r in reserving) == 1, reserving
    done = finished(harness, cp, [*first, big, *flood], timeout_s=60)
    assert {d["state"] for d in done} == {"SUCCEEDED"}
    assert_no_gpu_ran_two_at_once(harness)


@pytest.mark.parametrize("victim", ["vgpu0-1", "vgpu1"])
def test_a_worker_killed_with_its_gpus_held_lets_them_go_and_nothing_is_lost(
    harness: FleetHarness, victim: str
) -> None:
    cp = three_gpus(harness)
    blockers = [cp.invoke("pair", {"seconds": 30}).id] if victim == "vgpu0-1" else []
    blockers += [cp.invoke("single", {"seconds": 30}).id for _ in range(3 if victim == "vgpu1" else 0)]
    harness.wait_for(lambda: all(harness.runs(b) == 1 for b in blockers), what="the blockers running")
    held = {cp.status(b)["worker"] for b in blockers}
    assert f"{victim}@{host(harness)}" in held, held
    pid = next(g["pid"] for g in cp.gpus() if g["worker"] == f"{victim}@{host(harness)}")
    for child in psutil.Process(pid).children(recursive=True):
        os.kill(child.pid, signal.SIGKILL)  # the pool process, mid-task, holding its GPUs
    for b in blockers:
        cp.cancel(b)  # the killed one runs again on the replacement: cancelled there
    rest = [cp.invoke("pair", {"seconds": 0.2}).id for _ in range(2)]
    rest += [cp.invoke("single", {"seconds": 0.2}).id for _ in range(4)]
    done = finished(harness, cp, rest, timeout_s=60)
    assert {d["state"] for d in done} == {"SUCCEEDED"}
    assert_no_gpu_ran_two_at_once(harness)


def test_one_and_two_gpu_tasks_under_kills_all_finish_once_and_never_share_a_gpu(harness: FleetHarness) -> None:
    cp = three_gpus(harness)
    rng = random.Random(11)
    ids = [cp.invoke(rng.choice(["pair", "single", "single"]), {"seconds": 0.3}).id for _ in range(30)]
    for _ in range(5):  # SIGKILL a pool process mid-task, a one-GPU worker's or the pair's, five times over
        harness.wait_for(lambda: any(g["task_id"] for g in cp.gpus() if g["up"]), what="a task running")
        victim = rng.choice([g for g in cp.gpus() if g["up"] and g["task_id"]])
        for child in psutil.Process(victim["pid"]).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        time.sleep(1.0)
    done = finished(harness, cp, ids, timeout_s=120)
    assert {d["state"] for d in done} == {"SUCCEEDED"}, [d["state"] for d in done]  # 0 lost, no deadlock
    assert_no_gpu_ran_two_at_once(harness)
    records = [orjson.loads(f[b"value"]) for _, f in harness.redis.xrange(harness.registry.keys.callbacks)]
    successes = sorted(
        r["requestContext"]["requestId"] for r in records if r["requestContext"]["condition"] == "Success"
    )
    assert successes == sorted(ids)  # one Success record each


def test_when_fewer_tasks_wait_a_worker_gives_its_ticket_and_reservations_back(harness: FleetHarness) -> None:
    """Two hosts, each with a one-GPU task on GPU 0 and a 2-GPU worker waiting for GPUs 0-1: with two tasks waiting,
    both reserve; once one task is left, the first worker to ask gives its ticket and reservations back."""
    reg, queue = harness.registry, f"{harness.prefix}.pairs"

    def holds(host: str, worker: str, indices: tuple[int, ...]) -> Holds:
        return Holds(reg, host, worker, indices, reserve_after_s=0.0, queues=[queue])

    gangs = {}
    for host in ("h1", "h2"):
        assert holds(host, f"gpu0@{host}", (0,)).take()
        gangs[host] = holds(host, f"gpu0-1@{host}", (0, 1))
        assert not gangs[host].take(waiting=2)

    def reserved(host: str) -> set[str]:
        return {k.decode() for k in reg.client.hkeys(reg.keys.holds(host)) if k.startswith(b"r")}

    assert reserved("h1") == reserved("h2") == {"r0", "r1"}
    assert not gangs["h1"].take(waiting=1)  # the first to ask after the shrink
    assert reserved("h1") == set() and reg.client.zcard(reg.keys.tickets(queue)) == 1
    assert not gangs["h2"].take(waiting=1)
    assert reserved("h2") == {"r0", "r1"}
    assert not gangs["h1"].take(waiting=1) and reserved("h1") == set()  # no ticket left for it
