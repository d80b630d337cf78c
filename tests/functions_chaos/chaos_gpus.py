"""The chaos run's tasks of two GPUs and its checkpointing tasks (kept apart from tests/functions: a host that serves
a 2-GPU function runs a worker for its GPU pair). Each records every start under ``chaos:runs:<task id>`` as
``chaos`` does, so the run can tell a re-run a kill explains from one it does not."""

from __future__ import annotations

import os
import time
from typing import Any

import redis

from gpufleet import Context, function


def _start(ctx: Context) -> None:
    redis.Redis.from_url(os.environ["TEST_REDIS_URL"]).rpush(
        f"chaos:runs:{ctx.task_id}", f"{os.getpid()} {time.time()}"
    )


@function(name="chaos-pair", gpus=2, max_attempts=10, backoff_s=0.05, backoff_max_s=0.5)
def chaos_pair(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    _start(ctx)
    time.sleep(float(event.get("seconds", 0.1)))
    return {"i": event.get("i"), "attempt": ctx.attempt}


@function(name="chaos-steps", max_attempts=10, backoff_s=0.05, backoff_max_s=0.5)
def chaos_steps(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Five steps, each checkpointed: a run after a kill resumes at the last saved step, and the result is the same
    whatever the kills (the sum of the steps' squares)."""
    _start(ctx)
    saved = ctx.resume_from or {"step": 0, "total": 0}
    step, total = saved["step"], saved["total"]
    while step < 5:
        time.sleep(float(event.get("seconds", 0.1)) / 5)
        step += 1
        total += step * step
        ctx.checkpoint({"step": step, "total": total})
    return {"i": event.get("i"), "attempt": ctx.attempt, "total": total}


def _model(name: str) -> Any:
    """A function with a model to load (setup), kept loaded by few workers at once (``worker.warm_functions``), so
    that its tasks are routed to a worker that has it and a kill may land mid-load. A task served another function's
    model fails, and the run with it."""

    @function(name=name, max_attempts=10, backoff_s=0.05, backoff_max_s=0.5)
    def serve(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
        _start(ctx)
        if ctx.state != {"model": name}:
            raise RuntimeError(f"{name} was served the state {ctx.state!r}")
        time.sleep(float(event.get("seconds", 0.1)))
        return {"i": event.get("i"), "attempt": ctx.attempt}

    @serve.setup
    def load() -> dict[str, str]:
        time.sleep(0.1)
        return {"model": name}

    @serve.teardown
    def unload(state: dict[str, str]) -> None:
        state.clear()

    return serve


chaos_model_a, chaos_model_b, chaos_model_c = (_model(f"chaos-model-{x}") for x in "abc")
