"""The functions of ``make gpu-check``'s warm-model switch (copied into a fleet whose workers keep one loaded): two
models of ``GPU_CHECK_MODEL_MB`` each, copied from host memory to the GPU by setup(), and freed by teardown()."""

from __future__ import annotations

import os
from typing import Any

import gpu_work
from gpufleet import Context, function


def _model(name: str) -> Any:
    @function(name=name)
    def serve(event: Any, ctx: Context) -> dict[str, Any]:
        import torch

        gpu_work.sync()
        cuda = gpu_work.device().type == "cuda"
        allocated = torch.cuda.memory_allocated() // 2**20 if cuda else None
        return {"model": ctx.state["name"], "worker": ctx.worker, "allocated_mb": allocated}

    @serve.setup
    def load() -> dict[str, Any]:
        import torch

        size = int(os.environ.get("GPU_CHECK_MODEL_MB", "64")) * 2**20
        weights = torch.empty(size, dtype=torch.uint8).to(gpu_work.device())  # a load: host memory to the GPU
        gpu_work.sync()
        return {"name": name, "weights": weights}

    @serve.teardown
    def unload(state: dict[str, Any]) -> None:
        state.clear()  # the weights' last reference: gpufleet then empties torch's cache

    return serve


model_a, model_b = _model("model-a"), _model("model-b")
