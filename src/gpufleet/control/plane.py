"""The control plane: invoke, inspect, cancel and retry tasks; queues, functions and GPUs.

One implementation behind both the HTTP API (:mod:`gpufleet.api`) and the CLI. It talks to the registry in Redis
directly; every state change is one of the registry's atomic scripts, so the API and the workers never race.
Errors are :class:`~gpufleet.errors.RequestError` subclasses with a stable ``code``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import orjson

from gpufleet.config import Fleet
from gpufleet.control.changes import Changes, stored
from gpufleet.control.usage import By, parse_since, usage
from gpufleet.control.views import (
    decode_cursor,
    encode_cursor,
    function_view,
    group_gpus,
    listed,
    memory_wait,
    parse_state,
    served,
    task_view,
)
from gpufleet.delivery.parking import PARKED_ID, Parking
from gpufleet.delivery.records import iso
from gpufleet.errors import (
    ConflictError,
    EventError,
    InvalidRequestError,
    NotFoundError,
    NotReadyError,
    PayloadTooLargeError,
)
from gpufleet.functions import Function
from gpufleet.intake.ids import API_ORIGIN, api_task_id
from gpufleet.intake.path import Intake, Producer, check_priority
from gpufleet.registry import inventory, snapshot
from gpufleet.registry.jobs import SHARD_PAGE, JobStore, summary
from gpufleet.registry.messages import DEFAULT_PRIORITY, Envelopes, function_queue, parse_queue, queue_version
from gpufleet.registry.model import REDIS_ERRORS, Enqueued, State
from gpufleet.registry.snapshot import Snapshot
from gpufleet.registry.store import Registry
from gpufleet.scheduling.aliases import Aliases
from gpufleet.scheduling.placement import Placer
from gpufleet.scheduling.scaling import Need, needs
from gpufleet.scheduling.versions import ServedVersions, all_versions, versions

MAX_IDEMPOTENCY_KEY = 255
_STREAM_ID = re.compile(PARKED_ID)


@dataclass(frozen=True)
class Invocation:
    id: str
    created: bool  # False: the Idempotency-Key was seen before and this is the task it made


class ControlPlane:
    def __init__(self, fleet: Fleet, registry: Registry | None = None) -> None:
        self.fleet = fleet
        s = fleet.settings
        self.registry = registry or Registry.for_fleet(s)
        self.intake = Intake(
            fleet,
            Producer(API_ORIGIN, API_ORIGIN, s.defaults.max_payload_bytes),
            Placer(self.registry, fleet.functions.values(), fleet.settings.worker.reserve_after_s),
            Aliases(self.registry, s.aliases, strict=True),
            ServedVersions(self.registry, s.defaults.retention_s),
        )
        # Builds a stored task's message again: for retries and re-queues.
        self.envelopes = Envelopes(self.intake.factory, fleet.functions)
        self.jobs = JobStore(self.registry)
        self.changes = Changes(fleet, self.registry, self.jobs, self.envelopes)

    def ping(self) -> None:
        """Raise ``redis.ConnectionError``/``TimeoutError`` when the registry cannot be reached."""
        self.registry.client.ping()

    # -- functions -------------------------------------------------------------------------------------------

    def function(self, name: str) -> Function:
        fn = self.fleet.functions.get(name)
        if fn is None:
            raise NotFoundError("function_not_found", f"no function {name!r}; served: {sorted(self.fleet.functions)}")
        return fn

    def _check_active(self, fn: Function, version: str | None) -> None:
        """For a function that refuses rather than queues: the version asked for (any, for None) must be ACTIVE."""
        wanted = [v for v in versions(self.registry, fn) if version is None or v["version"] == version]
        if any(v["state"] == "ACTIVE" for v in wanted):
            return
        what = f"{fn.name}" + (f" version {version}" if version else "")
        errors = [v for v in wanted if v["state"] == "ERROR"]
        if errors and len(errors) == len([v for v in wanted if v["state"] != "INACTIVE"]):
            raise ConflictError(
                "version_error", f"{what}: setup() failed on every worker that tried: {errors[0].get('error')}"
            )
        states = sorted({v["state"] for v in wanted}) or ["INACTIVE"]
        raise NotReadyError(
            "version_not_active", f"{what} is {'/'.join(states)}: no live worker runs it yet; try again later"
        )

    def aliases(self, name: str) -> dict[str, dict[str, float]]:
        """The function's aliases: alias -> {version: weight} (see :mod:`gpufleet.scheduling.aliases`)."""
        assert self.intake.aliases is not None
        return self.intake.aliases.of(self.function(name).name)

    def set_alias(self, name: str, alias: str, weights: dict[str, float], by: str) -> dict[str, dict[str, float]]:
        """Point an alias of the function at these versions, for every intake from now on (logged)."""
        fn = self.function(name)
        assert self.intake.aliases is not None
        self.intake.aliases.set(fn.name, alias, weights, by)
        return self.intake.aliases.of(fn.name)

    def versions(self, name: str) -> list[dict[str, Any]]:
        """The function's versions and their states (see :mod:`gpufleet.scheduling.versions`)."""
        return versions(self.registry, self.function(name))

    def functions(self) -> list[dict[str, Any]]:
        """Every served function: its configuration, its versions with their states and queued tasks (None while
        Redis cannot be read: the rest is this process's own configuration, still worth listing), and its aliases."""
        served = sorted(self.fleet.functions.values(), key=lambda f: f.name)
        try:
            found: dict[str, list[dict[str, Any]]] | None = all_versions(self.registry, served)
        except REDIS_ERRORS:
            found = None
        aliases = self.intake.aliases
        assert aliases is not None
        # Redis unreachable (no versions read): the config's aliases, what this process knows without it.
        return [
            function_view(self.fleet.settings, fn, None, aliases.configured.get(fn.name, {}))
            if found is None
            else function_view(self.fleet.settings, fn, found[fn.name], aliases.of(fn.name))
            for fn in served
        ]

    # -- invoke ----------------------------------------------------------------------------------------------

    def invoke(
        self,
        function: str,
        event: Any,
        idempotency_key: str | None = None,
        traceparent: str | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> Invocation:
        """Queue one task for ``function`` (``embed``, or ``embed:4`` for version 4 alone). ``event`` is the event,
        or its JSON as ``bytes`` (the HTTP body: checked before it is decoded). The same ``idempotency_key`` always
        names the same task. The task joins the caller's W3C ``traceparent`` trace, or starts one."""
        fn = self.function(function.partition(":")[0])
        if idempotency_key is not None and (
            not 0 < len(idempotency_key) <= MAX_IDEMPOTENCY_KEY or not idempotency_key.isprintable()
        ):
            raise InvalidRequestError("bad_idempotency_key", "use 1 to 255 printable characters")
        task_id = api_task_id(fn.name, idempotency_key)
        try:
            _, version = self.intake.target(function)
            if fn.when_inactive == "refuse":
                self._check_active(fn, version)
            event = self.intake.decode(event) if isinstance(event, bytes) else self.intake.accept(event)
            task = self.intake.task(
                fn,
                event,
                task_id,
                API_ORIGIN,
                traceparent=traceparent,
                priority=check_priority(priority),
                version=version,
            )
        except EventError as exc:
            if exc.reason == "oversize":
                raise PayloadTooLargeError("payload_too_large", exc.detail) from None
            if exc.reason in ("schema_mismatch", "bad_priority", "bad_version", "unknown_version", "gpu_memory"):
                raise InvalidRequestError(exc.reason, exc.detail) from None
            code = "invalid_json" if exc.reason == "malformed_json" else exc.reason
            raise InvalidRequestError(code, f"the event is not one gpufleet can carry: {exc.detail}") from None
        [outcome] = self.registry.enqueue_many([task])
        if outcome is Enqueued.CONFLICT:
            raise ConflictError(
                "id_conflict", f"task {task_id} exists for another function or source; use another Idempotency-Key"
            )
        if outcome is Enqueued.DUPLICATE and idempotency_key is not None:
            [stored] = self.registry.stored_calls([task_id])
            if stored is not None and orjson.loads(stored[1]) != event:  # compared as values: key order is free
                raise ConflictError(
                    "idempotency_key_reused",
                    f"task {task_id} was made for another event with this "
                    "Idempotency-Key; use a new key for a new event",
                )
        return Invocation(task_id, outcome is Enqueued.CREATED)

    # -- tasks -----------------------------------------------------------------------------------------------

    def record(self, task_id: str, event: bool = False) -> dict[str, Any]:
        return stored(self.registry, task_id, event)

    def view(self, record: dict[str, Any], shards: tuple[int, int] = (0, SHARD_PAGE)) -> dict[str, Any]:
        """:func:`task_view`, plus the pool the task is queued or runs in, and whether that is not its function's
        first (it overflowed, see :mod:`gpufleet.scheduling.placement`). A job lists its shards ``(offset, limit)`` at a
        time; all of them count in its totals."""
        view = task_view(record)
        parsed = parse_queue(self.fleet.settings.redis.key_prefix, view["queue"] or "")
        fn = self.fleet.functions.get(view["function"])
        view["pool"] = parsed[0] if parsed else None
        view["version"] = queue_version(view["queue"] or "")  # the version asked for; None: any
        view["overflowed"] = bool(parsed and fn and parsed[0] != fn.gpu.pools[0])
        if fn is not None and fn.shards is not None:  # a job: split, then shards (listed), then merge
            view["phase"] = record.get("phase") or "split"
            if record.get("shards"):
                view["shards"] = summary(self.jobs.shards(record["id"], int(record["shards"])), *shards)
        if record.get("parent"):
            view["job"] = {"id": record["parent"], "index": int(record["index"])}
        return view

    def status(self, task_id: str, shards_offset: int = 0, shards_limit: int = SHARD_PAGE) -> dict[str, Any]:
        view = self.view(self.record(task_id), (shards_offset, shards_limit))
        if view["state"] == State.QUEUED:
            live = [e for e in self.gpus() if e.get("up") and not e["stale"]]
            view.update(served(view["queue"], live))
            fn = self.fleet.functions.get(view["function"])
            if not view["waiting_for"] and fn is not None and fn.gpu.memory_mb:
                view["waiting_for"] = memory_wait(fn.gpu.memory_mb, view["queue"], live)
        return view

    def _served(self, queue: str | None) -> dict[str, Any]:
        return served(queue, [e for e in self.gpus() if e.get("up") and not e["stale"]])

    def cancel(self, task_id: str) -> dict[str, Any]:
        """Cancel a task (see :meth:`Changes.cancel`)."""
        return self.changes.cancel(task_id)

    def expire_due(self, limit: int = 100) -> int:
        """Expire the QUEUED tasks past their ``max_event_age_s`` (see :meth:`Changes.expire_due`)."""
        return self.changes.expire_due(limit)

    def retry(self, task_id: str) -> dict[str, Any]:
        """Run a finished, unsuccessful task again (see :meth:`Changes.retry`)."""
        return self.changes.retry(task_id)

    def position(self, task_id: str) -> dict[str, Any]:
        """Where a QUEUED task stands: 1 = next to start. ``position`` is null when it is not waiting in a queue
        (running, finished, or waiting for a retry's backoff)."""
        record = self.record(task_id)
        out: dict[str, Any] = {
            "id": task_id,
            "state": record["state"],
            "position": None,
            "ahead": None,
            "queue": record.get("queue"),
            "queue_length": None,
        }
        if record["state"] == State.QUEUED and record.get("queue"):
            if record.get("retry_at"):
                out["retry_at"] = iso(float(record["retry_at"]))
            pos = self.registry.position(task_id, record["queue"])
            if pos is not None:
                out.update(position=pos[0] + 1, ahead=pos[0], queue_length=pos[1])
            out.update(self._served(record["queue"]))
        return out

    def tasks(
        self, function: str | None = None, state: str | None = None, limit: int = 50, cursor: str | None = None
    ) -> dict[str, Any]:
        """A page of tasks, newest first (by arrival). Pass back ``next_cursor`` for the next page."""
        max_page = self.fleet.settings.api.max_page
        if not 1 <= limit <= max_page:
            raise InvalidRequestError("bad_limit", f"limit must be between 1 and {max_page}")
        states = [parse_state(state)] if state else list(State)
        if function is not None:
            if function not in self.fleet.functions and function not in self.registry.functions_seen():
                raise NotFoundError("function_not_found", f"no function {function!r}")
            functions = [function]
        else:
            functions = sorted(set(self.fleet.functions) | self.registry.functions_seen())
        before = decode_cursor(cursor) if cursor else None
        rows: list[tuple[int, str, str, State]] = []
        for fn in functions:
            for st in states:
                rows += [(ts, i, fn, st) for ts, i in self.registry.list_ids(fn, st, before, limit + 1)]
        rows.sort(reverse=True)
        page, more = rows[:limit], len(rows) > limit
        items = []
        for (_, task_id, fn, st), record in zip(page, self.registry.get_many([r[1] for r in page]), strict=True):
            if record is None:
                self.registry.drop_from_index(fn, st, task_id)  # its record expired: tidy the index as we go
            elif state is None or record["state"] == st:
                items.append(listed(self.view(record)))  # its record has no shard count: no shards read
        next_cursor = encode_cursor(page[-1][0]) if more and page else None
        return {"items": items, "next_cursor": next_cursor}

    def queue(self, function: str) -> dict[str, Any]:
        """Queue length and counts per state for one function (finished states: records still retained)."""
        fn = self.function(function)
        counts = self.registry.counts(fn.name)
        queue = function_queue(self.fleet.settings.redis.key_prefix, fn)
        return {
            "function": fn.name,
            "queue": queue,
            **self._served(queue),
            "length": counts[State.QUEUED],
            "versions": {v["version"]: v["queued"] for v in versions(self.registry, fn)},
            "counts": counts,
            "summary": {
                "queued": counts[State.QUEUED],
                "running": counts[State.RUNNING],
                "completed": counts[State.SUCCEEDED],
                "failed": counts[State.FAILED] + counts[State.TIMED_OUT] + counts[State.EXPIRED],
                "cancelled": counts[State.CANCELLED],
            },
        }

    def gpus(self) -> list[dict[str, Any]]:
        return inventory.gpus(self.registry)

    def cordon(self, worker: str, reason: str = "") -> dict[str, Any]:
        """Take ``worker``'s GPU out of service: its worker finishes the task it runs, then stops, until it is
        uncordoned (see ``Supervisor._tend``)."""
        self._gpu(worker)
        inventory.cordon(self.registry, worker, reason or "cordoned by an operator", "operator")
        return {"worker": worker, "cordoned": True}

    def uncordon(self, worker: str) -> dict[str, Any]:
        """Back in service: its supervisor starts its worker again within seconds (a GPU still found broken is
        cordoned again)."""
        self._gpu(worker)
        was = inventory.uncordon(self.registry, worker)
        return {"worker": worker, "cordoned": False, "was_cordoned": was}

    def _gpu(self, worker: str) -> dict[str, Any]:
        for entry in self.gpus():
            if entry["worker"] == worker:
                return entry
        raise NotFoundError(
            "gpu_not_found", f"no GPU worker {worker!r:.100} in the inventory (gpufleet gpus lists them)"
        )

    def gpu_inventory(self) -> dict[str, Any]:
        """``{"items": every GPU slot, "pools": the same grouped by pool and model}`` (see :func:`group_gpus`)."""
        items = self.gpus()
        return {"items": items, "pools": group_gpus(items)}

    def usage(self, since: str = "24h", by: By = "function") -> list[dict[str, Any]]:
        """GPU seconds, runs and cost by function, pool or model since ``since`` (see :mod:`gpufleet.control.usage`)."""
        return usage(self.registry, self.fleet.settings, parse_since(since), by)

    def snapshot(self, minutes: int = 0) -> Snapshot:
        return snapshot.read(self.registry, list(self.fleet.functions), minutes)

    def recent_dead_letters(self, limit: int = 20) -> list[dict[str, Any]]:
        return snapshot.recent_dead_letters(self.registry, limit)

    def scaling(self, pool: str | None = None, model: str | None = None) -> list[Need]:
        """The scaling figure (see :mod:`gpufleet.scheduling.scaling`), for every pool and model or one of them. One
        with no queue and no host is all zeros: an autoscaler's query never fails for a pool that is idle."""
        s = self.fleet.settings
        found = needs(self.snapshot(), s.redis.key_prefix, s.worker.slots_per_worker)
        if pool is None:
            return found
        model = (model or "any").lower()
        match = [n for n in found if n.pool == pool and n.model == model]
        return match or [Need(pool, model, 0, 0, s.worker.slots_per_worker, 0, 0, 0, 0)]

    # -- parked records ----------------------------------------------------------------------------------------

    @property
    def parking(self) -> Parking:
        return Parking(self.registry.client, self.fleet.settings.redis.key_prefix)

    def parked(self, limit: int = 50, after: str | None = None) -> dict[str, Any]:
        """Records a destination refused for good, oldest first."""
        if after is not None and not _STREAM_ID.fullmatch(after):
            raise InvalidRequestError("bad_cursor", "after must be a parked record's id, like 1700000000000-0")
        return {"items": self.parking.entries(limit, after), "total": self.parking.count()}

    def resend_parked(self, ids: list[str] | None) -> int:
        """Back to delivery: the given parked records, or all with None."""
        return self.parking.resend(self._stream_ids(ids) if ids is not None else None)

    def drop_parked(self, ids: list[str]) -> int:
        return self.parking.drop(self._stream_ids(ids))

    @staticmethod
    def _stream_ids(ids: list[str]) -> list[str]:
        bad = [i for i in ids if not _STREAM_ID.fullmatch(i)]
        if bad:
            raise InvalidRequestError("bad_id", f"not a parked record's id: {bad[0]!r:.100}")
        return ids
