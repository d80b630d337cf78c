"""gpufleet functions of the benchmark; ``bench/run.py`` copies this file into its temporary fleet's functions folder.

``handlers`` is found on ``PYTHONPATH`` (the ``bench`` folder), so both sides run the very same code.
"""

from __future__ import annotations

import time
from typing import Any

import handlers
from gpufleet import Batch, BatchContext, Context, function


@function(name="noop", max_attempts=1)
def noop(event: Any, ctx: Context) -> None:
    """Target of the ingest workload; never run (no worker consumes during the ingest figures)."""


@function(name="stamp", max_attempts=1)
def stamp(event: dict[str, Any], ctx: Context) -> None:
    handlers.stamp(float(event["produced_ts"]), bool(event.get("warm", False)), str(event.get("side", "")))


@function(name="work", max_attempts=1)
def work(event: dict[str, Any], ctx: Context) -> None:
    handlers.work(
        float(event.get("ms", 20.0)),
        bool(event.get("warm", False)),
        str(event.get("side", "")),
        int(event.get("flush", 1)),
        bool(event.get("span", True)),
        int(event.get("rounds", 0)),
    )


@function(name="batchwork", max_attempts=1, batch=Batch(max_size=8, max_wait_ms=20))
def batchwork(events: list[dict[str, Any]], ctx: BatchContext) -> list[None]:
    """``work``, batched: 20 ms plus 5/7 ms per event after the first, so a batch of 8 takes 25 ms."""
    time.sleep((20.0 + (len(events) - 1) * 5 / 7) / 1000)
    return [None] * len(events)
