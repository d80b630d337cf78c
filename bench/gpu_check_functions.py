"""The functions ``make gpu-check`` serves (copied into its temporary fleet's functions folder)."""

from __future__ import annotations

import os
from typing import Any

import gpu_work
from gpufleet import Batch, BatchContext, Context, function


@function(name="pin")
def pin(event: Any, ctx: Context) -> dict[str, Any]:
    """Where the handler runs, as torch and NVML each see it: the check compares the two."""
    import torch

    out: dict[str, Any] = {"worker": ctx.worker, "visible": os.environ.get("CUDA_VISIBLE_DEVICES"), "cuda": False}
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        out.update(
            cuda=True,
            torch_name=props.name,
            torch_uuid=str(getattr(props, "uuid", "")),
            count=torch.cuda.device_count(),
        )
    memory = ctx.gpu_memory
    out["nvml_total_mb"] = memory.total_mb if memory else None
    return out


@function(name="matmul")
def matmul(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    return gpu_work.matmul(int(event.get("n", 4096)), int(event.get("repeat", 20)))


@function(name="oom", max_attempts=1, oom_retries=2)
def oom(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Asks for more memory than its GPU has on its first run (a real CUDA OOM; torch's own error in a rehearsal),
    then for 64 MiB: what the first run held must have been given back."""
    import torch

    first = gpu_work.client().incr(f"gpucheck:oom:{ctx.task_id}") == 1
    if first:
        if gpu_work.device().type != "cuda":
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (rehearsal)")
        memory = ctx.gpu_memory
        total = (memory.total_mb if memory else 1 << 20) * 2**20
        torch.empty(int(total * 1.5), dtype=torch.uint8, device=gpu_work.device())
    held = torch.empty(64 * 2**20, dtype=torch.uint8, device=gpu_work.device())
    allocated = torch.cuda.memory_allocated() // 2**20 if gpu_work.device().type == "cuda" else 0
    return {"allocated_mb": int(allocated), "held_mb": held.numel() // 2**20}


@function(name="busy")
def busy(event: dict[str, Any], ctx: Context) -> None:
    gpu_work.busy(float(event.get("ms", 100)), "gpufleet", ctx.worker)


@function(name="embed", batch=Batch(max_size=32, max_wait_ms=5))
def embed(events: list[dict[str, Any]], ctx: BatchContext) -> list[float]:
    return gpu_work.embed([int(e["seed"]) for e in events])


@function(name="embed-one")
def embed_one(event: dict[str, Any], ctx: Context) -> float:
    return gpu_work.embed([int(event["seed"])])[0]
