"""The GPU inventory: each host's supervisor publishes its GPU slots every few seconds (``P:gpus``), and the running
tasks' records say which task each worker runs. Read by the API, metrics, placement and scaling."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gpufleet.registry.store import Registry


def running(registry: Registry, rows: list[tuple[str, list[bytes | None]]] | None = None) -> dict[str, list[str]]:
    """Worker name -> the tasks it holds RUNNING, first started first: the one it runs, then (claimed ahead, while
    that one ran) the next. From the running tasks' records (``rows``: ``registry.running("worker", "started_at",
    ...)``, when the caller has read them): a claim writes nothing more for this (a worker -> task hash cost three
    commands a task)."""
    held: dict[str, list[tuple[float, str]]] = {}
    for task_id, (worker, started, *_) in registry.running("worker", "started_at") if rows is None else rows:
        if worker:
            held.setdefault(worker.decode(), []).append((float(started or 0), task_id))
    return {worker: [task_id for _, task_id in sorted(tasks)] for worker, tasks in held.items()}


def busy(registry: Registry, rows: list[tuple[str, list[bytes | None]]] | None = None) -> dict[str, str]:
    """Worker name -> the task it runs (of those it holds, the first started). ``rows``: as for :func:`running`."""
    return {worker: tasks[0] for worker, tasks in running(registry, rows).items()}


def held_by(registry: Registry, owner: str) -> list[tuple[str, str]]:
    """The RUNNING tasks whose owner token starts with ``owner`` (one process's: see ``worker.lease.owner_of``), as
    (id, token)."""
    return [(i, t.decode()) for i, (t,) in registry.running("token") if t and t.decode().startswith(owner)]


def publish_gpus(registry: Registry, entries: dict[str, dict[str, Any]]) -> None:
    """The GPU inventory of one host's supervisor, refreshed every few seconds: worker name -> details."""
    if entries:
        registry.client.hset(registry.keys.gpus, mapping={k: orjson.dumps(v) for k, v in entries.items()})


def gpus(
    registry: Registry,
    stale_after_s: float = 30.0,
    forget_after_s: float = 3600.0,
    seen_running: dict[str, list[str]] | None = None,
) -> list[dict[str, Any]]:
    """The inventory; entries not refreshed for ``stale_after_s`` are marked stale, and dropped after
    ``forget_after_s``. Each names the tasks its worker holds (``task_ids``: a batch's events each, or the task it
    runs and the next it claimed ahead) and the first of them (``task_id``). ``seen_running``: :func:`running`, when
    the caller has read it already."""
    raw: dict[bytes, bytes] = registry.client.hgetall(registry.keys.gpus)  # type: ignore[assignment]
    held, now, out = running(registry) if seen_running is None else seen_running, time.time(), []
    fenced = cordons(registry)
    for worker, value in sorted(raw.items()):
        entry = orjson.loads(value)
        age = now - float(entry.get("seen_at", 0))
        if age > forget_after_s:
            registry.client.hdel(registry.keys.gpus, worker)
            continue
        entry["stale"] = age > stale_after_s
        entry["task_ids"] = [] if entry["stale"] else held.get(worker.decode(), [])
        entry["task_id"] = entry["task_ids"][0] if entry["task_ids"] else None
        entry["cordoned"] = fenced.get(worker.decode())
        out.append(entry)
    return out


def cordons(registry: Registry) -> dict[str, dict[str, Any]]:
    """Worker name -> why its GPU is cordoned (``reason``), by whom (``by``: ``health`` or ``operator``), since when
    (``at``). A cordoned GPU takes no task: its supervisor stops its worker until it is uncordoned."""
    raw: dict[bytes, bytes] = registry.client.hgetall(registry.keys.cordons)  # type: ignore[assignment]
    return {worker.decode(): orjson.loads(value) for worker, value in raw.items()}


def cordon(registry: Registry, worker: str, reason: str, by: str) -> None:
    entry = {"reason": reason[:500], "by": by, "at": time.time()}
    registry.client.hset(registry.keys.cordons, worker, orjson.dumps(entry))


def uncordon(registry: Registry, worker: str) -> bool:
    """False if it was not cordoned."""
    return bool(registry.client.hdel(registry.keys.cordons, worker))
