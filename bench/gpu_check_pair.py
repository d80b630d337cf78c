"""``make gpu-check``'s task of two GPUs (copied into the second fleet where the machine has two GPUs or more)."""

from __future__ import annotations

import os
from typing import Any

from gpufleet import Context, function


@function(name="pair", gpus=2)
def pair(event: Any, ctx: Context) -> dict[str, Any]:
    """What a task of two GPUs sees: the check compares torch's devices with NVML's GPUs of the worker's pair."""
    import torch

    out: dict[str, Any] = {"worker": ctx.worker, "visible": os.environ.get("CUDA_VISIBLE_DEVICES", "")}
    out["gpus"] = os.environ.get("GPUFLEET_GPUS", "")
    out["count"] = torch.cuda.device_count() if torch.cuda.is_available() else 0
    out["uuids"] = [str(getattr(torch.cuda.get_device_properties(i), "uuid", "")) for i in range(out["count"])]
    return out
