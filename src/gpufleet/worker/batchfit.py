"""The largest batch of a function that fits its GPU model's memory, learnt when a larger one ran out.

When a batch call runs out of GPU memory it is halved (:mod:`gpufleet.worker.batch`); the largest call that then
fitted is written to ``P:fit:{function}:{model}`` for ``FIT_TTL_S``, and every worker with a GPU of that model forms
the function's batches no larger meanwhile. Then the function's ``max_size`` is tried again: the memory another
process held may be back, or the events that ran out smaller.
"""

from __future__ import annotations

import time

import structlog

from gpufleet.functions import Function
from gpufleet.registry.model import REDIS_ERRORS
from gpufleet.registry.store import Registry

log = structlog.get_logger("gpufleet.worker")
FIT_TTL_S = 3600
READ_EVERY_S = 10.0  # how stale a worker's view of another worker's finding may be


class BatchFit:
    def __init__(self, registry: Registry, model: str) -> None:
        self.registry = registry
        self.model = model
        self._read: dict[str, tuple[float, int | None]] = {}  # function -> (when read, its fit or None)
        self._ran_out: dict[str, tuple[int, float]] = {}  # function -> (the smallest size that ran out, until)

    def limit(self, fn: Function) -> int:
        """The most events a batch of ``fn`` takes on this GPU model now."""
        assert fn.batch is not None
        fit = self._fit(fn)
        return fn.batch.max_size if fit is None else max(1, min(fn.batch.max_size, fit))

    def ran_out(self, fn: Function, size: int) -> None:
        """A call of ``size`` events ran out of GPU memory."""
        smallest = min(size, self._ran_out.get(fn.name, (size, 0.0))[0])
        self._ran_out[fn.name] = (smallest, time.monotonic() + FIT_TTL_S)

    def fitted(self, fn: Function, size: int) -> None:
        """A call of ``size`` events returned: the fit, if a larger call ran out lately and no larger one fitted."""
        ran_out, until = self._ran_out.get(fn.name, (0, 0.0))
        if not size < ran_out or time.monotonic() > until:
            return
        fit = self._fit(fn)
        if fit is not None and fit >= size:
            return
        try:
            self.registry.client.set(self.registry.keys.batch_fit(fn.name, self.model), size, ex=FIT_TTL_S)
        except REDIS_ERRORS:  # this process keeps it; the others learn it the hard way
            log.warning("cannot share the batch size that fits", function=fn.name, exc_info=True)
        self._read[fn.name] = (time.monotonic(), size)
        log.warning("batch size capped: a larger batch ran out of GPU memory", function=fn.name, model=self.model,
                    max_size=size, ran_out_at=ran_out)  # fmt: skip

    def _fit(self, fn: Function) -> int | None:
        read_at, fit = self._read.get(fn.name, (-READ_EVERY_S, None))
        if time.monotonic() - read_at < READ_EVERY_S:
            return fit
        try:
            raw = self.registry.client.get(self.registry.keys.batch_fit(fn.name, self.model))
        except REDIS_ERRORS:
            return fit
        fit = int(raw) if raw else None
        self._read[fn.name] = (time.monotonic(), fit)
        return fit
