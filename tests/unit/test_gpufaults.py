"""Which exceptions are GPU faults (gpufleet.worker.gpufaults): out of memory, as each library says it, and the CUDA
errors that break a process's context; anything else is the handler's own error."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet import function
from gpufleet.errors import ConfigError
from gpufleet.worker.gpufaults import BROKEN, OOM, fault_of, free_memory


def test_torchs_own_out_of_memory_error_is_an_oom() -> None:
    torch = pytest.importorskip("torch")
    assert fault_of(torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")) == OOM
    assert fault_of(torch.cuda.OutOfMemoryError("")) == OOM  # by its type, whatever it says


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: out of memory",  # torch's RuntimeError from a kernel launch
        "CUDA_ERROR_OUT_OF_MEMORY: out of memory",  # the driver API (CuPy, numba)
        "cudaErrorMemoryAllocation: out of memory",  # CuPy
        "CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`",
        "cuDNN error: CUDNN_STATUS_ALLOC_FAILED",
        "RESOURCE_EXHAUSTED: Out of memory while trying to allocate 4294967296 bytes.",  # JAX / XLA
        "OOM when allocating tensor with shape[1024,1024,1024]",  # TensorFlow
        "Failed to allocate memory for requested buffer of size 1073741824",  # ONNX Runtime
    ],
)
def test_each_librarys_out_of_memory_is_an_oom(message: str) -> None:
    assert fault_of(RuntimeError(message)) == OOM


@pytest.mark.parametrize(
    "message",
    [
        "CUDA error: an illegal memory access was encountered",
        "CUDA error: device-side assert triggered",
        "CUDA error: misaligned address",
        "CUDA error: unspecified launch failure",
        "CUDA error: uncorrectable ECC error encountered",
        "CUDA_ERROR_ILLEGAL_ADDRESS: an illegal memory access was encountered",
    ],
)
def test_a_sticky_cuda_error_breaks_the_context(message: str) -> None:
    assert fault_of(RuntimeError(message)) == BROKEN


def test_a_fault_is_found_in_what_an_error_was_raised_from() -> None:
    def infer() -> None:
        try:
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        except RuntimeError as exc:
            raise ValueError("inference failed") from exc

    with pytest.raises(ValueError, match="inference failed") as wrapped:
        infer()
    assert fault_of(wrapped.value) == OOM


@pytest.mark.parametrize(
    "exc", [MemoryError("host RAM"), ValueError("out of memory"), KeyError("cuda"), RuntimeError("CUDA is great")]
)
def test_other_errors_are_the_handlers_own(exc: BaseException) -> None:
    assert fault_of(exc) is None


@given(st.text(max_size=300), st.booleans())
def test_any_message_and_a_cycle_of_causes_are_judged_without_error(message: str, cycle: bool) -> None:
    first, second = RuntimeError(message), ValueError(message[::-1])
    first.__cause__ = second
    if cycle:
        second.__context__ = first
    assert fault_of(first) in (None, OOM, BROKEN)


def test_freeing_memory_drops_the_frames_that_hold_it() -> None:
    class Tensor:
        pass

    import weakref

    def handler() -> None:
        big = Tensor()
        holder.append(weakref.ref(big))
        raise RuntimeError("CUDA out of memory")

    holder: list[weakref.ref[Tensor]] = []
    try:
        handler()
    except RuntimeError as exc:
        free_memory(exc)
        assert holder[0]() is None  # the traceback's frame no longer holds it


@pytest.mark.parametrize("bad", [-1, 11])
def test_oom_retries_are_a_small_budget(bad: int) -> None:
    with pytest.raises(ConfigError, match="oom_retries"):
        function(name="f", oom_retries=bad)(lambda event, ctx: None)
    assert function(name="f", oom_retries=0)(lambda event, ctx: None).oom_retries == 0
