"""Dynamic batching with one outcome per event: real Redis, real worker processes, the ``batched`` test function
(max_size 8, max_wait_ms 50, max_attempts 2, max_event_age_s 30) and ``crowd`` (timeout_s 1.5, max_attempts 3)."""

from __future__ import annotations

import pytest

from gpufleet.errors import ConfigError
from gpufleet.functions import Batch


@pytest.mark.parametrize(("size", "wait"), [(0, 10), (257, 10), (8, -1), (8, 10_001)])
def test_a_batch_policy_out_of_range_is_refused(size: int, wait: float) -> None:
    with pytest.raises(ConfigError):
        Batch(max_size=size, max_wait_ms=wait)
