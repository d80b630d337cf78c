"""Three functions with a slow setup() (a model to load) and a teardown() that unloads it, for the warm-model tests:
each counts its loads under ``loads:<host>:<function>`` and unloads under ``unloads:<host>:<function>``."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from gpufleet import Context, function


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["TEST_REDIS_URL"])


def _model(name: str) -> Any:
    def run(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
        assert ctx.state == {"model": name}, ctx.state
        time.sleep(event.get("seconds", 0.05))
        return {"worker": ctx.worker, "model": name}

    fn = function(name=name)(run)

    @fn.setup
    def load() -> dict[str, str]:
        time.sleep(float(os.environ.get("LOAD_S", "0.5")))
        _redis().incr(f"loads:{os.environ['GPUFLEET_WORKER__HOSTNAME']}:{name}")
        return {"model": name}

    @fn.teardown
    def unload(state: dict[str, str]) -> None:
        _redis().incr(f"unloads:{os.environ['GPUFLEET_WORKER__HOSTNAME']}:{name}")

    return fn


m1, m2, m3 = _model("m1"), _model("m2"), _model("m3")
