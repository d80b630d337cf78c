"""Small functions for smoke-testing a deployment: sleep, fail and gpu_info."""

from __future__ import annotations

import os
import socket
import time
from typing import Any

from pydantic import BaseModel, Field

from gpufleet import Context, function


class SleepRequest(BaseModel):
    seconds: float = Field(1.0, ge=0, le=86_400)


@function(name="sleep", timeout_s=86_400, max_attempts=1, payload=SleepRequest)
def sleep(event: SleepRequest, ctx: Context) -> dict[str, Any]:
    """Sleeps, reporting progress, and returns early when cancelled."""
    start = time.monotonic()
    while (elapsed := time.monotonic() - start) < event.seconds:
        if ctx.cancelled:
            return {"slept_s": round(elapsed, 3), "cancelled": True}
        ctx.progress(elapsed / event.seconds if event.seconds else 1.0, f"{elapsed:.1f}/{event.seconds:g} s")
        time.sleep(min(0.1, event.seconds - elapsed))
    return {"slept_s": round(time.monotonic() - start, 3), "cancelled": False}


@function(name="fail", max_attempts=2, backoff_s=0.2)
def fail(event: Any, ctx: Context) -> None:
    """Always raises, so the failure path (retries, then a RetriesExhausted record) can be seen."""
    message = event.get("message", "failing on purpose") if isinstance(event, dict) else "failing on purpose"
    raise RuntimeError(f"{message} (attempt {ctx.attempt})")


@function(name="gpu_info", timeout_s=120, max_attempts=1)
def gpu_info(event: Any, ctx: Context) -> dict[str, Any]:
    """Reports the device this task ran on, as the handler sees it."""
    info: dict[str, Any] = {"host": socket.gethostname(), "pid": os.getpid(), "worker": ctx.worker, "gpu": ctx.gpu,
                            "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES")}  # fmt: skip
    try:
        import torch
    except ImportError:
        return {**info, "torch": None}
    info["torch"] = torch.__version__
    info["cuda"] = torch.cuda.is_available()
    if info["cuda"]:
        props = torch.cuda.get_device_properties(0)
        info.update(device=props.name, memory_mb=props.total_memory // 2**20, capability=f"{props.major}.{props.minor}")
    return info
