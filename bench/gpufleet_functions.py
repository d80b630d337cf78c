"""gpufleet functions of the benchmark; ``bench/run.py`` copies this file into its temporary fleet's functions folder.

``handlers`` is found on ``PYTHONPATH`` (the ``bench`` folder), so both sides run the very same code.
"""

from __future__ import annotations

from typing import Any

import handlers
from gpufleet import Context, function


@function(name="noop", max_attempts=1)
def noop(event: Any, ctx: Context) -> None:
    """Target of the ingest workload; never run (no worker consumes during the ingest figures)."""


@function(name="stamp", max_attempts=1)
def stamp(event: dict[str, Any], ctx: Context) -> None:
    handlers.stamp(float(event["produced_ts"]), bool(event.get("warm", False)), str(event.get("side", "")))


@function(name="work", max_attempts=1)
def work(event: dict[str, Any], ctx: Context) -> None:
    handlers.work(float(event.get("ms", 20.0)), bool(event.get("warm", False)), str(event.get("side", "")))
