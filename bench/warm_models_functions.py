"""bench/warm_models.py's functions: f0 .. f7, each with a ``WARM_LOAD_S`` setup() (a model to load) and a
``WARM_SERVE_S`` handler; each load counts under ``warm:<run>:loads`` (and by function, ``warm:<run>:loads_by``)."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from gpufleet import Context, function

RUN = os.environ.get("WARM_RUN", "run")


def _make(name: str) -> Any:
    def serve(event: dict[str, Any], ctx: Context) -> str:
        time.sleep(float(os.environ.get("WARM_SERVE_S", "0.1")))
        return str(ctx.state)

    fn = function(name=name, max_attempts=3)(serve)

    @fn.setup
    def load() -> str:
        time.sleep(float(os.environ.get("WARM_LOAD_S", "2")))
        client = redis.Redis.from_url(os.environ["WARM_REDIS_URL"])
        client.incr(f"warm:{RUN}:loads")
        client.hincrby(f"warm:{RUN}:loads_by", name, 1)
        return name

    return fn


f0, f1, f2, f3, f4, f5, f6, f7 = (_make(f"f{i}") for i in range(8))
