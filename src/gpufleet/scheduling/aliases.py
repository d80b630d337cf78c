"""Aliases: a name for one or more versions of a function, with weights, as Lambda's weighted aliases (a canary).

``embed:prod`` picks a version at intake, each with its alias's weight (``prod: {"3": 0.9, "4": 0.1}``), and the task
is queued for that version alone; a retry keeps it (its queue says it). The alias ``default``, when a function has
one, is what a plain ``embed`` means; without one, ``embed`` goes to the function's queue, which every version's
workers read. A qualifier that names no alias is a version (``embed:4``).

Aliases come from the fleet's config (``aliases: {embed: {prod: {"3": 0.9, "4": 0.1}}}``) and can be changed at run
time (:meth:`Aliases.set`, ``gpufleet alias``, ``PUT /v1/functions/{name}/aliases/{alias}``): the change is kept in
Redis (``<prefix>:aliases``), where it wins over the config, logged, and appended to ``<prefix>:alias-log``. Intake
reads them at most once a second.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

import orjson
import structlog

from gpufleet.errors import InvalidRequestError
from gpufleet.functions import ALIAS_RE, weights_problem
from gpufleet.registry.model import REDIS_ERRORS

if TYPE_CHECKING:
    from gpufleet.registry.store import Registry

log = structlog.get_logger("gpufleet.scheduling.aliases")

DEFAULT = "default"
REFRESH_S = 1.0
LOG_MAX = 10_000  # changes kept in the alias log

Weights = dict[str, float]  # version -> weight


class Aliases:
    def __init__(
        self,
        registry: Registry,
        configured: Mapping[str, Mapping[str, Weights]],
        choose: Callable[[], float] = random.random,
        *,
        strict: bool = False,
    ) -> None:
        """``strict``: a read of Redis that fails raises (what a person asks through the API or the CLI must not be
        answered from stale or missing aliases); otherwise intake goes on with the last ones read (a trigger)."""
        self.registry = registry
        self.strict = strict
        self.key = registry.keys.aliases
        self.configured = {fn: dict(aliases) for fn, aliases in configured.items()}
        self._choose = choose
        self._set: dict[str, dict[str, Weights]] = {}  # set at run time: function -> alias -> weights
        self._read_at = -REFRESH_S

    def of(self, function: str) -> dict[str, Weights]:
        """The function's aliases now: the config's, with those set at run time over them."""
        self._refresh()
        return {**self.configured.get(function, {}), **self._set.get(function, {})}

    def resolve(self, function: str, qualifier: str | None) -> str | None:
        """The version a task of ``function[:qualifier]`` is for: an alias's pick, the qualifier itself when it names
        no alias, or None (no qualifier and no ``default`` alias: any version)."""
        # Once per message a trigger takes in: no lock (the refresh swaps whole dicts, and two refreshes at once do
        # no harm), no merged copy, and nothing at all without aliases.
        self._refresh()
        set_now = self._set.get(function)
        configured = self.configured.get(function)
        name = qualifier or DEFAULT
        weights = (set_now or {}).get(name) or (configured or {}).get(name)
        if weights is None:
            return qualifier
        point, total = self._choose() * sum(weights.values()), 0.0
        for version, weight in weights.items():
            total += weight
            if point < total:
                return version
        return next(reversed(weights))  # point == total: rounding

    def set(self, function: str, alias: str, weights: Weights, by: str) -> None:
        """Point ``alias`` at these versions from now on, for every intake; logged, with who asked (``by``).

        Raises:
            InvalidRequestError: a bad alias name or weights.
        """
        if not ALIAS_RE.fullmatch(alias):
            raise InvalidRequestError(
                "bad_alias",
                f"alias {alias!r:.50}: use a lowercase letter, then letters, digits, '_' or '-' (32 at most)",
            )
        problem = weights_problem(weights)
        if problem is not None:
            raise InvalidRequestError("bad_weights", f"alias {alias!r}: {problem}")
        entry = {"function": function, "alias": alias, "weights": weights, "by": by, "at": time.time()}
        pipe = self.registry.pipeline()
        pipe.hset(self.key, f"{function}:{alias}", orjson.dumps(weights))
        pipe.xadd(self.registry.keys.alias_log, {"change": orjson.dumps(entry)}, maxlen=LOG_MAX)
        pipe.execute()
        log.info("alias changed", function=function, alias=alias, weights=weights, by=by)
        self._read_at = -REFRESH_S  # this process sees it at once

    def _refresh(self) -> None:
        if time.monotonic() - self._read_at < REFRESH_S:
            return
        try:
            self._read()
        except REDIS_ERRORS as exc:  # intake goes on with what it knew: an alias is never a reason to refuse
            if self.strict:
                raise
            log.warning("cannot read the aliases set at run time; using the last ones read", error=str(exc))
            self._read_at = time.monotonic()

    def _read(self) -> None:
        raw: dict[bytes, bytes] = self.registry.client.hgetall(self.key)  # type: ignore[assignment]
        found: dict[str, dict[str, Weights]] = {}
        for field, value in raw.items():
            function, _, alias = field.decode().partition(":")
            found.setdefault(function, {})[alias] = orjson.loads(value)
        self._set, self._read_at = found, time.monotonic()
