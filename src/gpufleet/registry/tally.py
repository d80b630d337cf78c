"""The queue-wait and duration histograms (``P:m:wait``, ``P:m:duration``) and the GPU time by function, GPU model and
pool (``P:m:gpu_time``), added up in the worker and written about once a second.

They were counted by the claim and finish scripts, in the same atomic step as each transition: four ``HINCRBY`` a
task, 6 % of Redis's work per task (callgrind, empty tasks). A histogram needs no such step: the state counters
(``P:m:finished``) stay in the scripts, exact, and these follow within ``FLUSH_S`` of an observation. A pool process
that dies loses what it had not written yet, as any Prometheus client's process does.
"""

from __future__ import annotations

import bisect
import threading
import time
from typing import Any

from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS, US, Keyspace, gpu_time_field

FLUSH_S = 1.0  # how long an observation may wait to be written
GPU_HOURS_KEPT_S = 35 * 86_400  # how far back `gpufleet usage` can look


class Tally:
    """One process's observations not yet written. Thread-safe: the runtime observes, the lease keeper writes."""

    def __init__(self, keys: Keyspace) -> None:
        self._keys = keys
        self._lock = threading.Lock()
        self._adds: dict[tuple[str, str], int] = {}  # (histogram key, field) -> what to add
        self._since = 0.0  # monotonic time of the oldest observation not written, 0 for none

    def observe(self, name: str, function: str, seconds: float) -> None:
        """One observation of ``name`` (``wait`` or ``duration``): its bucket (the first bound it does not pass, as
        Prometheus's ``le``) and the sum in whole microseconds."""
        seconds = max(seconds, 0.0)
        bucket = bisect.bisect_left(HISTOGRAM_BOUNDS, seconds) + 1  # 1-based; len + 1 is +Inf
        key = self._keys.metric(name)
        self._add(key, ((f"{function}{US}{bucket}", 1), (f"{function}{US}sum_us", round(seconds * 1e6))))

    def gpu_time(self, function: str, model: str, pool: str, seconds: float) -> None:
        """One attempt's GPU time (handler time x GPUs held) on GPUs of ``model``, in ``pool``: what placement's
        estimates and ``gpufleet_gpu_seconds_total`` read."""
        us = round(max(seconds, 0.0) * 1e6)
        adds = ((gpu_time_field(function, model, pool, "us"), us), (gpu_time_field(function, model, pool, "n"), 1))
        self._add(self._keys.metric("gpu_time"), adds)
        self._add(self._keys.gpu_hour(int(time.time() // 3600)), adds)  # for `gpufleet usage --since`

    def _add(self, key: str, adds: tuple[tuple[str, int], ...]) -> None:
        with self._lock:
            for field, add in adds:
                self._adds[key, field] = self._adds.get((key, field), 0) + add
            self._since = self._since or time.monotonic()

    @property
    def pending(self) -> bool:
        return bool(self._since)

    def due(self) -> bool:
        return self.pending and time.monotonic() - self._since >= FLUSH_S

    def write(self, pipe: Any) -> None:
        """Everything observed so far, added to ``pipe`` (the caller executes it). Written once: a pipeline that
        fails loses these observations, never counts them twice."""
        with self._lock:
            adds, self._adds, self._since = self._adds, {}, 0.0
        for (key, field), add in adds.items():
            pipe.hincrby(key, field, add)
        for key in {key for key, _ in adds if key.startswith(self._keys.gpu_hour_prefix)}:
            pipe.expire(key, GPU_HOURS_KEPT_S)
