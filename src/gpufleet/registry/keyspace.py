"""Every Redis key of a fleet, the entry format of its callback stream, and the Lua scripts that change them.

No other module spells a key: each asks a :class:`Keyspace`. The scripts are the ``.lua`` files in ``scripts/``
beside this module, read when first used (:func:`script`); the key layout below is theirs too.

Key layout (prefix ``P``):

- ``P:task:{id}`` hash: the task record;
- ``P:idx:{function}:{state}`` sorted set of task ids by arrival number (``seq``): listing, counts per state;
- ``P:pending:{queue}`` sorted set of QUEUED task ids by arrival order: queue position is a ZRANK, O(log n);
- ``P:seq`` arrival counter (a task's ``seq`` field is its first); ``P:functions`` set of function names seen;
- ``P:leases``, ``P:delayed`` and ``P:deadlines`` sorted sets of task ids (lease deadline, retry due time, event
  age limit);
- ``P:callbacks`` stream of outgoing records (:data:`CALLBACK_FIELDS`); which task a worker runs is read from the
  leases and their records (:func:`gpufleet.registry.inventory.running`);
- ``P:queues`` set of the Celery queues tasks were pushed to (for the lost-message scan);
- ``P:m:*``: what :mod:`gpufleet.api.metrics` reads. ``P:m:created`` (function -> tasks created) and
  ``P:m:finished`` (function US state -> tasks finished) are counters; ``P:m:wait`` and ``P:m:duration`` are
  histograms (function US bucket number, or function US ``sum_us``, whole microseconds; a ``sum`` in seconds is an
  older release's, and readers add both); ``P:m:gpu_time`` adds up GPU time (function US model US pool US ``us``:
  handler microseconds times GPUs held; ``... US n``: attempts), and ``P:m:gpu_hour:{hour}`` the same per hour (kept
  35 days, for ``gpufleet usage``); ``P:m:min:{minute}`` counts ``ok``/``failed``
  per minute for the dashboard's chart (kept two hours). US is the ASCII unit separator, which no name may contain;
- ``P:gpus``, ``P:ready``, ``P:setup``, ``P:host:{host}``, ``P:cordons``: the GPU inventory, the pool processes
  ready, each function's setup() per worker, a supervisor's heartbeat, the GPUs cordoned and why;
- ``P:warm:{queue}``: the workers that read the queue and have its function loaded (``worker.warm_functions``), by
  when each last said so (gpufleet.worker.warmup.Affinity);
- ``P:ckpt:{id}``: a task's last checkpoint (``ctx.checkpoint``: JSON, or where in the object store it lies), kept
  as long as its record;
- ``P:holds:{host}``: which worker holds each GPU of a host that serves a multi-GPU function (index -> worker), and
  the reservations of the multi-GPU workers that wait (``r<index>``), and ``P:tickets:{queue}``, which of those
  workers may reserve (as many as tasks wait there; gpufleet.worker.holds);
- ``P:flows``, ``P:flow:{id}`` (with ``:lease`` and ``:state``), ``P:router``, ``P:parked``: the dispatcher's
  delivery flows, its router lease, and the records parked for good;
- ``P:fit:{function}:{model}``: the largest batch that fitted the model's memory lately (gpufleet.worker.batchfit);
- ``P:aliases``, ``P:alias-log``, ``P:dead_letter_key``, ``P:poll:{trigger}``, ``P:session:{id}``,
  ``P:hand-over``: aliases and their history, the key that signs dead letters, a polling trigger's checkpoint, a
  dashboard session, the lock of the pool hand-over.

The position score of a pending task is its place in the Celery list: a push to the back (``LPUSH``) scores
``+seq``, a push to the head (``RPUSH``) scores ``-seq``. So the pending tasks in score order are the list's own
order, and a pending task ordered before the one at the head of the list has already left the list. Celery's own
lists (``<prefix>.<pool>.<model>[.<function>]``, one per priority level) are named in
:mod:`gpufleet.registry.messages`.
"""

from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from importlib import resources
from typing import Any

import orjson

US = "\x1f"
# Upper bounds, in seconds, of the queue-wait and duration histograms' buckets (then +Inf): from a 10 ms task to a
# 24 h one. Fixed, so every script and every reader agree on them.
# fmt: skip below: a list of numbers reads better packed than one per line.
HISTOGRAM_BOUNDS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600,
                    86400)  # fmt: skip
# A pending task's position score is (9 - priority) * LEVEL_SCORE + seq (or - seq at the head), as helpers.lua's LEVEL
# writes it, with seq below LEVEL_SCORE / 2: the tasks of one priority score within LEVEL_SCORE / 2 of their level's.
LEVEL_SCORE = 2**49


def priority_scores(priority: int) -> tuple[str, str]:
    """The score range (ZCOUNT's min and max, exclusive) of a pending set's tasks of ``priority``."""
    centre = (9 - priority) * LEVEL_SCORE
    return f"({centre - LEVEL_SCORE // 2}", f"({centre + LEVEL_SCORE // 2}"


def gpu_time_field(function: str, model: str, pool: str, part: str) -> str:
    return f"{function}{US}{model}{US}{pool}{US}{part}"


# The entries of the callback stream, each destination's flow and the parked stream. A finish writes these (with
# ``add_callback`` in helpers.lua, which spells them in Lua) and the dispatcher routes them by ``dest``; a record
# parked, or re-sent from there, carries its headers as JSON instead (PARKED_FIELDS), and a parked one its
# ``reason`` and ``parked_at``. Read them with :func:`stream_entry`.
CALLBACK_FIELDS = ("dest", "key", "value", "condition", "function", "traceparent")
PARKED_FIELDS = ("dest", "key", "value", "headers")


@dataclass(frozen=True)
class StreamEntry:
    """A callback, flow or parked stream entry, as read."""

    dest: str  # the destination's URL as configured (secrets included)
    key: str  # the task id (a dead letter's own id)
    value: bytes
    headers: dict[str, str] | None  # None: a parked entry's headers that cannot be read
    reason: str = ""  # a parked entry's
    parked_at: float = 0.0


def entry_dest(fields: dict[bytes, bytes]) -> str:
    """An entry's destination URL alone: what the dispatcher routes it by."""
    return fields.get(b"dest", b"").decode(errors="replace")


def stream_entry(fields: dict[bytes, bytes]) -> StreamEntry:
    """An entry of any of those streams. A finish's headers are its condition, function and W3C traceparent."""
    headers: dict[str, str] | None
    if b"headers" in fields:
        try:
            headers = orjson.loads(fields[b"headers"])
        except orjson.JSONDecodeError:
            headers = None
        if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
            headers = None
    else:
        headers = {
            "condition": fields.get(b"condition", b"").decode(),
            "function": fields.get(b"function", b"").decode(),
        }
        if fields.get(b"traceparent"):
            headers["traceparent"] = fields[b"traceparent"].decode()
    return StreamEntry(
        entry_dest(fields),
        fields.get(b"key", b"").decode(errors="replace"),
        fields.get(b"value", b""),
        headers,
        fields.get(b"reason", b"").decode(errors="replace"),
        float(fields.get(b"parked_at", b"0") or 0),
    )


def parked_fields(
    dest: str, key: str, value: bytes, headers: dict[str, str], reason: str | None = None
) -> dict[str, Any]:
    """An entry with its headers as JSON: a record re-sent to the callback stream, or (with a ``reason``) parked."""
    out: dict[str, Any] = {"dest": dest, "key": key, "value": value, "headers": orjson.dumps(headers)}
    if reason is not None:
        out |= {"reason": reason[:2000], "parked_at": repr(time.time())}
    return out


# Each script is its own file, after the shared definitions it uses: those of ``helpers`` (every transition's
# bookkeeping) and ``create`` (a task's creation), and only those. Redis runs a script's whole body at each call, so
# each definition costs every call (a closure, a table): all 28 of helpers cost 26,000 instructions a call, as much
# as ten HGETs. These stand alone: a lease, a flow, an index trim.
_ALONE = ("lapse", "renew", "trim_index", "route", "lease_take", "flow_retire", "lease_release", "hold", "unhold")
_SHARED = ("helpers", "create")
_DEFINITION = re.compile(r"local (?:function )?(\w+)")
_COMMENT = re.compile(r"--[^\n]*")


@functools.cache
def _part(name: str) -> str:
    """One ``.lua`` file, read once per process."""
    return resources.files("gpufleet.registry").joinpath("scripts", f"{name}.lua").read_text()


@functools.cache
def _definitions() -> list[tuple[str, str]]:
    """(name, source) of each top-level definition of the shared files, in file order, with the comment above it:
    a line at column 0 that starts with ``local`` begins one, a comment at column 0 belongs to the next one."""
    found: list[tuple[str, list[str]]] = []
    for part in _SHARED:
        comments: list[str] = []
        for line in _part(part).splitlines():
            if line.startswith("--"):
                comments.append(line)
            elif line.startswith("local "):
                defined = _DEFINITION.match(line)
                assert defined is not None  # "local " and a name: the pattern matches
                found.append((defined[1], [*comments, line]))
                comments = []
            else:
                found[-1][1].append(line)
    return [(name, "\n".join(lines)) for name, lines in found]


@functools.cache
def script(name: str) -> str:
    """The Lua source of script ``name`` (``scripts/<name>.lua``), after the shared definitions it uses, directly or
    through another."""
    body = _part(name)
    if name in _ALONE:
        return body
    definitions = _definitions()
    used, code, grew = set(), _COMMENT.sub("", body), True
    while grew:
        grew = False
        for defined, source in definitions:
            if defined not in used and re.search(rf"\b{defined}\b", code):
                used.add(defined)
                code += _COMMENT.sub("", source)
                grew = True
    return "\n".join([*(source for defined, source in definitions if defined in used), body])


class Keyspace:
    """The keys of the fleet whose prefix is ``prefix`` (``redis.key_prefix``)."""

    def __init__(self, prefix: str) -> None:
        self.prefix = prefix
        self.leases = f"{prefix}:leases"
        self.delayed = f"{prefix}:delayed"
        self.deadlines = f"{prefix}:deadlines"
        self.callbacks = f"{prefix}:callbacks"
        self.functions = f"{prefix}:functions"
        self.queues = f"{prefix}:queues"
        self.gpus = f"{prefix}:gpus"
        self.cordons = f"{prefix}:cordons"
        self.ready = f"{prefix}:ready"
        self.setup = f"{prefix}:setup"
        self.flows = f"{prefix}:flows"
        self.router = f"{prefix}:router"
        self.parked = f"{prefix}:parked"
        self.aliases = f"{prefix}:aliases"
        self.alias_log = f"{prefix}:alias-log"
        self.dead_letter_key = f"{prefix}:dead_letter_key"
        self.hand_over = f"{prefix}:hand-over"

    def task(self, task_id: str) -> str:
        return f"{self.prefix}:task:{task_id}"

    def index(self, function: str, state: str) -> str:
        return f"{self.prefix}:idx:{function}:{state}"

    def pending(self, queue: str) -> str:
        return f"{self.prefix}:pending:{queue}"

    def warm(self, queue: str) -> str:
        """The workers reading ``queue`` that have its function loaded, by when they last said so."""
        return f"{self.prefix}:warm:{queue}"

    def metric(self, name: str) -> str:
        """``P:m:<name>``: created, finished, wait, duration, gpu_time, overflow, dead, dead_recent, trigger_lag,
        delivered, parked."""
        return f"{self.prefix}:m:{name}"

    @property
    def gpu_hour_prefix(self) -> str:
        return f"{self.prefix}:m:gpu_hour:"

    def gpu_hour(self, hour: int) -> str:
        """``P:m:gpu_hour:{hour}``: the GPU time counters (as ``P:m:gpu_time``) of one hour since the epoch."""
        return f"{self.gpu_hour_prefix}{hour}"

    def batch_fit(self, function: str, model: str) -> str:
        """The largest batch of ``function`` that fitted a GPU of ``model`` after a larger one ran out of memory."""
        return f"{self.prefix}:fit:{function}:{model}"

    def minute(self, minute: int) -> str:
        return f"{self.prefix}:m:min:{minute}"

    def flow(self, flow_id: str) -> str:
        return f"{self.prefix}:flow:{flow_id}"

    def flow_lease(self, flow_id: str) -> str:
        return f"{self.prefix}:flow:{flow_id}:lease"

    def flow_state(self, flow_id: str) -> str:
        return f"{self.prefix}:flow:{flow_id}:state"

    def host(self, hostname: str) -> str:
        return f"{self.prefix}:host:{hostname}"

    def holds(self, hostname: str) -> str:
        return f"{self.prefix}:holds:{hostname}"

    def tickets(self, queue: str) -> str:
        return f"{self.prefix}:tickets:{queue}"

    def checkpoint(self, task_id: str) -> str:
        return f"{self.prefix}:ckpt:{task_id}"

    def poll(self, trigger: str) -> str:
        return f"{self.prefix}:poll:{trigger}"

    def session(self, session: str) -> str:
        return f"{self.prefix}:session:{session}"
