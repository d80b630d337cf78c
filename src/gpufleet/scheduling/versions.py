"""A function version's state, derived from the live workers, as NVIDIA Cloud Functions names them:

- ``ACTIVE``: at least one live worker serves it, and its ``setup()`` succeeded there;
- ``DEPLOYING``: workers that serve it are starting, or running its ``setup()``;
- ``ERROR``: ``setup()`` failed on every live worker that tried it (the error is kept and shown);
- ``INACTIVE``: the fleet declares it, but no live worker serves it.

Workers report their warm-up per function (:mod:`gpufleet.worker.warmup`) in ``<prefix>:setup``; a report counts
while the worker that wrote it is live and runs the same process (the inventory's pid).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterable
from enum import StrEnum
from typing import TYPE_CHECKING, Any

import orjson

from gpufleet.registry import inventory
from gpufleet.registry.keyspace import US
from gpufleet.registry.messages import parse_queue, queue_name, queue_version
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.scheduling.placement import LIVE_S

if TYPE_CHECKING:
    from gpufleet.functions import Function
    from gpufleet.registry.store import Registry

SETUP, READY, ERROR = "setup", "ready", "error"  # what a worker reports per function


class VersionState(StrEnum):
    ACTIVE = "ACTIVE"
    DEPLOYING = "DEPLOYING"
    ERROR = "ERROR"
    INACTIVE = "INACTIVE"


def report_setup(registry: Registry, worker: str, report: dict[str, dict[str, Any]]) -> None:
    """How a worker's warm-up went, per function name: ``{"version", "state", "pid", "error"?}``."""
    now = time.time()
    registry.client.hset(
        registry.keys.setup,
        mapping={f"{worker}{US}{fn}": orjson.dumps({**entry, "at": now}) for fn, entry in report.items()},
    )


def versions(registry: Registry, fn: Function) -> list[dict[str, Any]]:
    """Each version of ``fn`` that is declared here, served by a live worker or asked for: its state, its live
    workers, the tasks queued for it alone (``embed:4``, or an alias's pick; for ``$LATEST``, the function's own
    queue), and the setup error for ``ERROR``. The declared one first, then the others by name."""
    return all_versions(registry, [fn])[fn.name]


def all_versions(registry: Registry, fns: Iterable[Function]) -> dict[str, list[dict[str, Any]]]:
    """:func:`versions` of each function, by name: three round trips to Redis whatever the number of functions."""
    fns = list(fns)
    entries = inventory.gpus(registry, stale_after_s=LIVE_S)
    raw: dict[bytes, bytes] = registry.client.hgetall(registry.keys.setup)  # type: ignore[assignment]
    reports: dict[str, dict[str, Any]] = {}  # function -> worker -> its report
    for key, value in raw.items():
        worker, _, name = key.decode().partition(US)
        reports.setdefault(name, {})[worker] = orjson.loads(value)
    queued_for: dict[str, set[str]] = {}  # function -> versions tasks were queued for, served or not
    for queue in registry.queues():
        parsed, version = parse_queue(registry.prefix, queue), queue_version(queue)
        if parsed is not None and parsed[2] is not None and version is not None:
            queued_for.setdefault(parsed[2], set()).add(version)
    found = {fn.name: _found(registry.prefix, fn, entries, reports.get(fn.name, {})) for fn in fns}
    orders = {
        fn.name: [fn.version, *sorted((set(found[fn.name][0]) | queued_for.get(fn.name, set())) - {fn.version})]
        for fn in fns
    }
    pipe = registry.pipeline()  # each version's own queues: what waits for that version alone
    for fn in fns:
        for version in orders[fn.name]:
            for pool in fn.gpu.pools:
                queue = queue_name(registry.prefix, pool, fn.gpu.model, fn.name, version)
                pipe.zcard(registry.keys.pending(queue))
    depths = iter(pipe.execute())
    out = {}
    for fn in fns:
        states_of, errors, starting = found[fn.name]
        views = []
        for version in orders[fn.name]:
            states = states_of.get(version, [])
            if READY in states:
                state = VersionState.ACTIVE
            elif SETUP in states or (version == fn.version and starting):
                state = VersionState.DEPLOYING
            elif states:
                state = VersionState.ERROR
            else:
                state = VersionState.INACTIVE
            queued = sum(next(depths) for _ in fn.gpu.pools)
            view: dict[str, Any] = {
                "version": version,
                "state": state.value,
                "workers": len(states),
                "declared": version == fn.version,
                "queued": queued,
            }
            if state is VersionState.ERROR:
                view["error"] = errors.get(version)
            views.append(view)
        out[fn.name] = views
    return out


class ServedVersions:
    """The versions of each function that a worker of this fleet has served lately (it reported their setup within
    ``window_s``), read from Redis at most once a ``REFRESH_S``: what a qualifier (``embed:4``) may name besides the
    declared version. A version whose hosts are all down for a while (a rolling update) stays one; a name no worker
    ever served does not. Not known (None) until Redis was read once."""

    REFRESH_S = 1.0

    def __init__(self, registry: Registry, window_s: float) -> None:
        self.registry, self.window_s = registry, window_s
        self._served: dict[str, set[str]] | None = None
        self._read_at = -self.REFRESH_S

    def of(self, fn: Function) -> set[str] | None:
        now = time.monotonic()
        if now - self._read_at >= self.REFRESH_S:
            self._read_at = now
            with contextlib.suppress(*REDIS_ERRORS):  # what was known stays; the publish after waits for Redis
                self._served = self._read()
        return None if self._served is None else self._served.get(fn.name, set())

    def _read(self) -> dict[str, set[str]]:
        raw: dict[bytes, bytes] = self.registry.client.hgetall(self.registry.keys.setup)  # type: ignore[assignment]
        since, served = time.time() - self.window_s, dict[str, set[str]]()
        for key, value in raw.items():
            entry = orjson.loads(value)
            if entry.get("at", 0) >= since:
                served.setdefault(key.decode().partition(US)[2], set()).add(entry["version"])
        return served


def _found(
    prefix: str,
    fn: Function,
    entries: list[dict[str, Any]],
    reports: dict[str, Any],
) -> tuple[dict[str, list[str]], dict[str, str], int]:
    """From the live workers that serve ``fn``: version -> the setup states they report, version -> the first
    setup error, and how many have not reported yet (their process is booting)."""
    queues = {queue_name(prefix, pool, fn.gpu.model, fn.name) for pool in fn.gpu.pools}
    found: dict[str, list[str]] = {}
    errors: dict[str, str] = {}
    starting = 0
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
    return found, errors, starting
