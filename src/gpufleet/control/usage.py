"""What the fleet's GPUs were used for: GPU seconds, runs and cost by function, pool or GPU model, over the last
hours (``gpufleet usage``, ``GET /v1/usage``).

Read from the hourly GPU time counters the workers keep (``P:m:gpu_hour:{hour}``: see
:mod:`gpufleet.registry.tally`): every run of every task, those that failed, timed out or ran out of memory included,
at handler time x GPUs held. So the window is counted in whole hours: ``--since 90m`` covers this hour and the one
before. The cost is the GPU seconds at ``worker.gpu_hour_price`` for their model, where it is priced.
"""

from __future__ import annotations

import math
import re
import time
from typing import Any, Literal

from gpufleet.errors import InvalidRequestError
from gpufleet.registry.keyspace import US
from gpufleet.registry.store import Registry
from gpufleet.settings import FleetSettings

By = Literal["function", "pool", "model"]
BY: tuple[By, ...] = ("function", "pool", "model")
MAX_SINCE_S = 35 * 86_400  # what the hourly counters keep
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86_400}
SINCE_PATTERN = r"([1-9][0-9]{0,6})([smhd]?)"


def parse_since(text: str) -> float:
    """``90m``, ``24h``, ``7d`` (or plain seconds) as seconds; past what the counters keep, all they keep.

    Raises:
        InvalidRequestError: ``bad_since``.
    """
    match = re.fullmatch(SINCE_PATTERN, text)
    if not match:
        raise InvalidRequestError("bad_since", f"since {text!r:.40}: use e.g. 90m, 24h or 7d")
    return min(MAX_SINCE_S, float(match.group(1)) * _UNITS[match.group(2) or "s"])


def usage(registry: Registry, settings: FleetSettings, since_s: float, by: By) -> list[dict[str, Any]]:
    """One row per function (or pool, or GPU model): ``gpu_seconds``, ``runs`` and ``cost`` (None where none of its
    GPU models is priced), the largest first."""
    if by not in BY:
        raise InvalidRequestError("bad_by", f"by {by!r:.40}: use one of {list(BY)}")
    now = int(time.time() // 3600)
    hours = range(now - math.ceil(since_s / 3600) + 1, now + 1)
    pipe = registry.pipeline()
    for hour in hours:
        pipe.hgetall(registry.keys.gpu_hour(hour))
    prices = {model.lower(): price for model, price in settings.worker.gpu_hour_price.items()}
    rows: dict[str, dict[str, Any]] = {}
    for counters in pipe.execute():
        for name, value in counters.items():
            function, model, pool, part = name.decode().split(US)
            key = {"function": function, "pool": pool, "model": model}[by]
            row = rows.setdefault(key, {by: key, "gpu_seconds": 0.0, "runs": 0, "cost": None})
            if part == "n":
                row["runs"] += int(value)
                continue
            seconds = int(value) / 1e6
            row["gpu_seconds"] += seconds
            price = prices.get(model.lower())
            if price is not None:
                row["cost"] = (row["cost"] or 0.0) + seconds / 3600 * price
    for row in rows.values():
        row["gpu_seconds"] = round(row["gpu_seconds"], 3)
        row["cost"] = None if row["cost"] is None else round(row["cost"], 6)
    return sorted(rows.values(), key=lambda r: (-r["gpu_seconds"], r[by]))
