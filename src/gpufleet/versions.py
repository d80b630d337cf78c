"""A function version's state, derived from the live workers, as NVIDIA Cloud Functions names them:

- ``ACTIVE``: at least one live worker serves it, and its ``setup()`` succeeded there;
- ``DEPLOYING``: workers that serve it are starting, or running its ``setup()``;
- ``ERROR``: ``setup()`` failed on every live worker that tried it (the error is kept and shown);
- ``INACTIVE``: the fleet declares it, but no live worker serves it.

Workers report their warm-up per function (:mod:`gpufleet.worker.warmup`) in ``<prefix>:setup``; a report counts
while the worker that wrote it is live and runs the same process (the inventory's pid).
"""

from __future__ import annotations

import time
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from gpufleet.lua import US
from gpufleet.messages import parse_queue, queue_name, queue_version
from gpufleet.placer import LIVE_S

if TYPE_CHECKING:
    from gpufleet.functions import Function
    from gpufleet.registry import Registry

SETUP, READY, ERROR = "setup", "ready", "error"  # what a worker reports per function


class VersionState(StrEnum):
    ACTIVE = "ACTIVE"
    DEPLOYING = "DEPLOYING"
    ERROR = "ERROR"
    INACTIVE = "INACTIVE"


def report_setup(registry: Registry, worker: str, report: dict[str, dict[str, Any]]) -> None:
    """How a worker's warm-up went, per function name: ``{"version", "state", "pid", "error"?}``."""
    now = time.time()
    registry.client.hset(f"{registry.prefix}:setup", mapping={f"{worker}{US}{fn}": orjson.dumps({**entry, "at": now})
                                                              for fn, entry in report.items()})  # fmt: skip


def versions(registry: Registry, fn: Function) -> list[dict[str, Any]]:
    """Each version of ``fn`` that is declared here, served by a live worker or asked for: its state, its live
    workers, the tasks queued for it alone (``embed:4``, or an alias's pick; for ``$LATEST``, the function's own
    queue), and the setup error for ``ERROR``. The declared one first, then the others by name."""
    entries = registry.gpus(stale_after_s=LIVE_S)
    raw: dict[bytes, bytes] = registry.client.hgetall(f"{registry.prefix}:setup")  # type: ignore[assignment]
    reports = {}
    for key, value in raw.items():
        worker, _, name = key.decode().partition(US)
        if name == fn.name:
            reports[worker] = orjson.loads(value)
    queues = {queue_name(registry.prefix, pool, fn.gpu.model, fn.name) for pool in fn.gpu.pools}
    found: dict[str, list[str]] = {}  # version -> the states its live workers report
    errors: dict[str, str] = {}
    starting = 0  # live workers that serve the function and have not reported yet (their process is booting)
    for entry in entries:
        if entry["stale"] or not queues & set(entry.get("queues", [])):
            continue
        report = reports.get(entry["worker"])
        if not entry.get("up") or report is None or report.get("pid") != entry.get("pid"):
            starting += 1
            continue
        found.setdefault(report["version"], []).append(report["state"])
        if report["state"] == ERROR:
            errors.setdefault(report["version"], report.get("error") or "setup() failed")
    queued_for: set[str] = set()  # versions tasks were queued for, served or not
    for queue in registry.queues():
        parsed, version = parse_queue(registry.prefix, queue), queue_version(queue)
        if parsed is not None and parsed[2] == fn.name and version is not None:
            queued_for.add(version)
    order = [fn.version, *sorted((set(found) | queued_for) - {fn.version})]
    pipe = registry.pipeline()  # each version's own queues: what waits for that version alone
    for version in order:
        for pool in fn.gpu.pools:
            pipe.zcard(f"{registry.prefix}:pending:{queue_name(registry.prefix, pool, fn.gpu.model, fn.name, version)}")
    depths = iter(pipe.execute())
    queued = {version: sum(next(depths) for _ in fn.gpu.pools) for version in order}
    out = []
    for version in order:
        states = found.get(version, [])
        if READY in states:
            state = VersionState.ACTIVE
        elif SETUP in states or (version == fn.version and starting):
            state = VersionState.DEPLOYING
        elif states:
            state = VersionState.ERROR
        else:
            state = VersionState.INACTIVE
        view: dict[str, Any] = {"version": version, "state": state.value, "workers": len(states),
                                "declared": version == fn.version, "queued": queued[version]}  # fmt: skip
        if state is VersionState.ERROR:
            view["error"] = errors.get(version)
        out.append(view)
    return out
