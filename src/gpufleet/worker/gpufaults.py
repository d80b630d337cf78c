"""What a handler's exception says about its GPU, and what to do about it.

- Out of memory (:data:`OOM`): ``torch.cuda.OutOfMemoryError``, CUDA's "out of memory" from other libraries
  (CuPy, JAX/XLA, TensorFlow, ONNX Runtime), cuBLAS and cuDNN allocation failures. The process frees what it can
  (:func:`free_memory`) and the task runs again under its function's ``oom_retries``, which do not spend its
  attempts (:mod:`gpufleet.worker.attempt`); a batch is halved (:mod:`gpufleet.worker.batch`).
- A broken CUDA context (:data:`BROKEN`): an illegal address, a device-side assert, an uncorrectable ECC error, a
  launch failure. CUDA's sticky errors: every later call in this process fails too, so the process is replaced, and
  the task goes back uncounted, under the same budget (a task that breaks every context it runs in is failed, not
  run for ever).

Nothing here imports torch: a handler that uses it has imported it already (``sys.modules``).
"""

from __future__ import annotations

import gc
import re
import sys
import traceback
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from gpufleet.worker.gpus import Device

OOM: Literal["oom"] = "oom"
BROKEN: Literal["broken"] = "broken"
Fault = Literal["oom", "broken"]

_OOM_TYPES = frozenset({"OutOfMemoryError", "ResourceExhaustedError"})  # torch (2.5+: torch.OutOfMemoryError), TF
_OOM_TEXT = re.compile(
    r"CUDA out of memory|CUDA error: out of memory|CUDA_ERROR_OUT_OF_MEMORY|cudaErrorMemoryAllocation"
    r"|CUBLAS_STATUS_ALLOC_FAILED|CUDNN_STATUS_ALLOC_FAILED|cuDNN error: CUDNN_STATUS_NOT_ENOUGH_WORKSPACE"
    r"|RESOURCE_EXHAUSTED: Out of memory|OOM when allocating tensor|out of memory while trying to allocate"
    r"|Failed to allocate memory for requested buffer",
    re.IGNORECASE,
)
_BROKEN_TEXT = re.compile(
    r"illegal memory access|CUDA_ERROR_ILLEGAL_ADDRESS|cudaErrorIllegalAddress|misaligned address"
    r"|device-side assert|illegal instruction|unspecified launch failure|CUDA_ERROR_LAUNCH_FAILED"
    r"|uncorrectable ECC error|CUDA_ERROR_ECC_UNCORRECTABLE|GPU has fallen off the bus|CUDA_ERROR_DEVICE_UNAVAILABLE"
    r"|the launch timed out and was terminated",
    re.IGNORECASE,
)


def fault_of(exc: BaseException) -> Fault | None:
    """Whether ``exc`` (or an exception it was raised from, or while handling) is a GPU fault, and which."""
    seen: set[int] = set()
    at: BaseException | None = exc
    while at is not None and id(at) not in seen and len(seen) < 16:
        seen.add(id(at))
        text = str(at)
        if type(at).__name__ in _OOM_TYPES or _OOM_TEXT.search(text):
            return OOM
        if _BROKEN_TEXT.search(text):
            return BROKEN
        at = at.__cause__ or at.__context__
    return None


def free_memory(exc: BaseException) -> None:
    """What an OOM leaves held, given back: the frames of its traceback (their locals hold the tensors), Python's
    garbage, and torch's cached blocks."""
    at: BaseException | None = exc
    while at is not None:
        traceback.clear_frames(at.__traceback__)
        at = at.__cause__ or at.__context__
    free_caches()


def free_caches() -> None:
    """Give back what nothing refers to any more: Python's garbage, and torch's cached CUDA blocks where torch runs on
    CUDA in this process (after an OOM, or once a model is unloaded)."""
    gc.collect()
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.empty_cache()  # type: ignore[attr-defined]


def _torch_cuda() -> object | None:
    torch = sys.modules.get("torch")
    return torch if torch is not None and torch.cuda.is_initialized() else None


def reset_peak() -> None:
    """Before a handler call: torch's allocator counts its peak from here."""
    torch = _torch_cuda()
    if torch is not None:
        torch.cuda.reset_peak_memory_stats()  # type: ignore[attr-defined]


def peak_mb(device: Device) -> int | None:
    """The most GPU memory the call held (MiB): torch's allocator's peak when torch runs on CUDA in this process,
    else NVML's figure for this process now (read only then: this is on every task's path), else None (no GPU)."""
    torch = _torch_cuda()
    if torch is not None:
        return int(torch.cuda.max_memory_allocated()) // (1024 * 1024)  # type: ignore[attr-defined]
    memory = device.memory(fresh=True)
    return None if memory is None else memory.own_mb
