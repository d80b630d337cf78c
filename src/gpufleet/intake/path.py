"""The one path from an event to a task, for every producer: each trigger, and invoke (HTTP API and CLI).

:class:`Intake` decides what becomes a task, in this order, and nothing else does:

1. the size: the raw event against the producer's ``max_payload_bytes`` (``oversize``), before it is decoded;
2. the event: JSON gpufleet can carry (:mod:`gpufleet.intake.events`), checked once, here;
3. the function: one this fleet serves (``unknown_function``), its payload model (``schema_mismatch``), and a GPU
   of the fleet big enough for it (``gpu_memory``: see :meth:`~gpufleet.scheduling.placement.Placer.too_big`);
4. the id: the producer derives it with :mod:`gpufleet.intake.ids` (its namespace), and intake records its ``origin``;
5. the destinations: the producer's (a trigger's ``on_success``/``on_failure``), then the function's, then the
   fleet's defaults;
6. the envelope: a Celery message built from a template
   (:class:`~gpufleet.registry.messages.MessageFactory`), no Celery app.

A refusal is an :class:`~gpufleet.errors.EventError` with a stable reason: a trigger dead-letters the message with
it, the API answers 4xx with it as the code. Publishing is the producer's (one atomic registry call per batch).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

from gpufleet import trace
from gpufleet.errors import EventError
from gpufleet.functions import VERSION_RE, Function
from gpufleet.intake.events import check_event, decode_event
from gpufleet.registry.keyspace import US
from gpufleet.registry.messages import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY, MessageFactory, queue_name
from gpufleet.registry.model import NewTask

if TYPE_CHECKING:
    from gpufleet.config import Fleet
    from gpufleet.scheduling.aliases import Aliases
    from gpufleet.scheduling.placement import Placer
    from gpufleet.scheduling.versions import ServedVersions


@dataclass(frozen=True)
class Producer:
    """Who submits: the API or one trigger. Its destinations, when set, win over the function's."""

    name: str  # "api", or the trigger's name: the task's meta says which
    origin: str  # who may name its ids (see gpufleet.intake.ids)
    max_payload_bytes: int
    on_success: str | None = None
    on_failure: str | None = None


class Intake:
    def __init__(
        self,
        fleet: Fleet,
        producer: Producer,
        placer: Placer | None = None,
        aliases: Aliases | None = None,
        served: ServedVersions | None = None,
    ) -> None:
        self.fleet = fleet
        self.producer = producer
        s = fleet.settings
        self.factory = MessageFactory(s.redis.key_prefix, s.worker.kill_grace_s)
        # The pool of each task of a function with several (overflow); without one, every task in its first pool.
        self.placer = placer
        # Which version an alias (or a plain name, with a "default" alias) stands for; without them, none.
        self.aliases = aliases
        # The versions workers served lately: a qualifier naming none of them, nor the declared one, is refused.
        self.served = served

    def decode(self, raw: bytes) -> Any:
        """The event in ``raw`` JSON bytes: the size first (nothing oversize is decoded), then the JSON."""
        self.check_size(len(raw))
        return decode_event(raw)

    def accept(self, event: Any) -> Any:
        """An event that arrived decoded (a Python caller of invoke): the same checks as :meth:`decode`."""
        check_event(event)  # before dumps: orjson refuses what nests too deep, with a less useful message
        self.check_size(len(orjson.dumps(event)))
        return event

    def check_size(self, size: int) -> None:
        limit = self.producer.max_payload_bytes
        if size > limit:
            raise EventError("oversize", f"{size} bytes > max_payload_bytes {limit}")

    def function(self, name: str) -> Function:
        fn = self.fleet.functions.get(name)
        if fn is None:
            raise EventError("unknown_function", f"no function {name!r:.200}; served: {sorted(self.fleet.functions)}")
        return fn

    def target(self, name: str) -> tuple[Function, str | None]:
        """``embed`` (any version serves it, unless it has a ``default`` alias), ``embed:4`` (only workers whose code
        is version 4) or ``embed:prod`` (an alias: a version picked by its weights): the function and the version.

        Raises:
            EventError: ``unknown_function``; ``bad_version`` for a version no function could declare;
                ``unknown_version`` for a qualifier that names no alias, nor the declared version, nor one that a
                worker served lately (its tasks would wait for ever).
        """
        name, _, qualifier = name.partition(":")
        fn = self.function(name)
        version = self.aliases.resolve(fn.name, qualifier or None) if self.aliases else (qualifier or None)
        if version is None:
            return fn, None
        if not VERSION_RE.fullmatch(version):
            raise EventError("bad_version", f"version {version!r:.50} of {name!r}: use letters, digits, '.', '_', '-'")
        if version == qualifier and version != fn.version and self.served is not None:  # named, not an alias's pick
            served = self.served.of(fn)
            if served is not None and version not in served:
                lately = sorted(served) or "no other"
                raise EventError(
                    "unknown_version",
                    f"{name}:{version}: no such version; this fleet declares "
                    f"{fn.version}, and its workers served lately {lately}",
                )
        return fn, version

    def task(
        self,
        fn: Function,
        payload: Any,
        task_id: str,
        source: str,
        *,
        event_ts: float | None = None,
        meta: dict[str, Any] | None = None,
        origin: str | None = None,
        traceparent: str | bytes | None = None,
        priority: int = DEFAULT_PRIORITY,
        version: str | None = None,
    ) -> NewTask:
        """The task for a checked event: its payload matched against the function's model, its destinations and
        envelope. ``origin`` overrides the producer's (object events share one namespace, whoever saw them). The
        task is a span of the event's ``traceparent`` trace (see :mod:`gpufleet.trace`). ``priority``: see
        :func:`check_priority`."""
        mismatch = fn.payload_error(payload)
        if mismatch is not None:
            raise EventError("schema_mismatch", mismatch)
        too_big = self.placer.too_big(fn) if self.placer is not None else None
        if too_big is not None:
            raise EventError("gpu_memory", too_big)
        p, defaults = self.producer, self.fleet.settings.defaults
        meta = {"source": source, "trigger": p.name, **(meta or {}), trace.HEADER: trace.child(traceparent)}
        queue, overflow = None, ""
        if self.placer is not None and len(fn.gpu.pools) > 1:
            queue, placed = self.placer.queue_for(fn, version, priority)
            if placed is not None and placed.overflowed:
                overflow = f"{fn.gpu.pools[0]}{US}{placed.pool}"
        elif version is not None:  # that version's own queue, in the function's pool
            queue = queue_name(self.fleet.settings.redis.key_prefix, fn.gpu.pools[0], fn.gpu.model, fn.name, version)
        return NewTask(  # positional: keywords cost twice as much, once per message a trigger takes in
            self.factory.build(task_id, fn, payload, meta, priority, queue),  # message
            p.on_success or fn.on_success or defaults.on_success,  # on_success
            p.on_failure or fn.on_failure or defaults.on_failure,  # on_failure
            fn.max_attempts,  # max_attempts
            source,  # source
            event_ts or time.time(),  # event_ts
            origin or p.origin,  # origin
            fn.max_event_age_s,  # max_age_s
            overflow,  # overflow
        )


def check_priority(value: object) -> int:
    """A task's priority, from a header, a field or a request: an integer from 0 (lowest) to 9 (highest), given as a
    number or as its digits.

    Raises:
        EventError: ``bad_priority``, anything else.
    """
    if isinstance(value, bytes):
        value = value.decode(errors="replace")
    if isinstance(value, str) and value.strip().isdigit() and len(value.strip()) == 1:
        value = int(value.strip())
    if isinstance(value, int) and not isinstance(value, bool) and MIN_PRIORITY <= value <= MAX_PRIORITY:
        return value
    raise EventError("bad_priority", f"priority {value!r:.50} must be an integer from {MIN_PRIORITY} to {MAX_PRIORITY}")
