"""The GPU inventory: each host's supervisor publishes its GPU slots every few seconds (``P:gpus``), and each claim
says which task a worker runs (``P:busy``). Read by the API, metrics, placement and scaling."""

from __future__ import annotations

import time
from typing import Any

import orjson

from gpufleet.registry.store import Registry


def busy(registry: Registry) -> dict[str, str]:
    """Worker name -> the task it runs."""
    raw: dict[bytes, bytes] = registry.client.hgetall(registry.keys.busy)  # type: ignore[assignment]
    return {k.decode(): v.decode() for k, v in raw.items()}


def publish_gpus(registry: Registry, entries: dict[str, dict[str, Any]]) -> None:
    """The GPU inventory of one host's supervisor, refreshed every few seconds: worker name -> details."""
    if entries:
        registry.client.hset(registry.keys.gpus, mapping={k: orjson.dumps(v) for k, v in entries.items()})


def served_queues(registry: Registry) -> set[str]:
    """The queues some live worker consumes, from the inventory the supervisors publish."""
    return {q for entry in gpus(registry) if entry.get("up") and not entry["stale"] for q in entry.get("queues", [])}


def gpus(
    registry: Registry,
    stale_after_s: float = 30.0,
    forget_after_s: float = 3600.0,
    seen_busy: dict[str, str] | None = None,
) -> list[dict[str, Any]]:
    """The inventory; entries not refreshed for ``stale_after_s`` are marked stale, and dropped after
    ``forget_after_s``. ``seen_busy``: :func:`busy`, when the caller has read it already."""
    raw: dict[bytes, bytes] = registry.client.hgetall(registry.keys.gpus)  # type: ignore[assignment]
    running, now, out = busy(registry) if seen_busy is None else seen_busy, time.time(), []
    for worker, value in sorted(raw.items()):
        entry = orjson.loads(value)
        age = now - float(entry.get("seen_at", 0))
        if age > forget_after_s:
            registry.client.hdel(registry.keys.gpus, worker)
            continue
        entry["stale"] = age > stale_after_s
        entry["task_id"] = running.get(worker.decode()) if not entry["stale"] else None
        out.append(entry)
    return out
