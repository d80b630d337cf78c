"""The scaling figure: how many GPU worker hosts each pool and GPU model needs now.

    desired = ceil((queued + running) / slots per worker)

per pool and model, over the queues ``<prefix>.<pool>.<model>.<function>`` (a function that takes ``any`` GPU has
its own, model ``any``). ``slots per
worker`` is the most GPU slots a live host of that pool and model reports, or ``worker.slots_per_worker`` while none
does (scaling from zero).

It is a target, not a delta: a worker that is still starting (its supervisor reports, its pool process has not
finished ``setup()``) takes no task, so the backlog and the figure stay the same until it does, and an autoscaler
that compares the figure with the replicas it has (KEDA, the HPA: starting pods count) never adds a second host for
the same backlog. ``additional`` is the same figure for autoscalers that add hosts rather than set a count: it
subtracts ready and starting hosts alike.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import asdict, dataclass
from typing import Any

from gpufleet.registry.messages import parse_queue
from gpufleet.registry.snapshot import Snapshot


@dataclass(frozen=True)
class Need:
    pool: str
    model: str
    queued: int
    running: int
    slots_per_worker: int
    ready: int  # hosts with a ready slot of this pool and model
    starting: int  # hosts up whose slots are not ready yet
    desired: int
    additional: int

    def view(self) -> dict[str, Any]:
        return asdict(self)


def pool_model(prefix: str, queue: str) -> tuple[str, str] | None:
    """``gpufleet.eu.h100.embed`` -> ``("eu", "h100")``; None for a queue that is not a GPU queue of this fleet."""
    parsed = parse_queue(prefix, queue)
    return None if parsed is None else parsed[:2]


def needs(snapshot: Snapshot, prefix: str, default_slots: int) -> list[Need]:
    """The figure for every pool and model that has a queue or a live host."""
    queued: dict[tuple[str, str], int] = defaultdict(int)
    running: dict[tuple[str, str], int] = defaultdict(int)
    for q in snapshot.queues.values():
        key = pool_model(prefix, q.name)
        if key is not None:
            queued[key] += q.depth
            running[key] += q.running
    # Per host: its slots per (pool, model) queue it consumes, and whether any of them is ready.
    slots: dict[tuple[str, str], dict[str, int]] = defaultdict(lambda: defaultdict(int))
    ready_hosts: dict[tuple[str, str], set[str]] = defaultdict(set)
    for entry in snapshot.gpus:
        if not entry.get("up") or entry["stale"]:
            continue
        # One slot per pool and model, however many of its function queues it reads.
        for key in {k for k in (pool_model(prefix, q) for q in entry.get("queues", [])) if k is not None}:
            slots[key][entry["host"]] += 1
            if entry["ready"]:
                ready_hosts[key].add(entry["host"])
    out = []
    for key in sorted(set(queued) | set(running) | set(slots)):
        hosts = slots.get(key, {})
        per_worker = max(hosts.values(), default=default_slots)
        desired = math.ceil((queued[key] + running[key]) / per_worker)
        ready = len(ready_hosts[key])
        out.append(
            Need(
                key[0],
                key[1],
                queued[key],
                running[key],
                per_worker,
                ready,
                len(hosts) - ready,
                desired,
                max(0, desired - len(hosts)),
            )
        )
    return out
