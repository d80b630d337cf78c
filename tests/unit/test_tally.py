"""The wait and duration histograms a worker adds up (registry/tally.py): Prometheus's buckets, written once."""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gpufleet.registry import tally
from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS, US, Keyspace
from gpufleet.registry.tally import Tally


class Pipe:
    def __init__(self) -> None:
        self.adds: dict[tuple[str, str], int] = {}

    def hincrby(self, key: str, field: str, add: int) -> Any:
        self.adds[key, field] = self.adds.get((key, field), 0) + add


@given(st.floats(min_value=-1, max_value=200_000, allow_nan=False))
def test_an_observation_lands_in_the_first_bucket_whose_bound_it_does_not_pass(seconds: float) -> None:
    t, pipe = Tally(Keyspace("P")), Pipe()
    t.observe("wait", "fn", seconds)
    t.write(pipe)
    [(key, field)] = [k for k in pipe.adds if not k[1].endswith("sum_us")]
    bucket = int(field.split(US)[1])
    le = [*HISTOGRAM_BOUNDS, float("inf")][bucket - 1]
    assert key == "P:m:wait" and max(seconds, 0) <= le
    assert bucket == 1 or max(seconds, 0) > HISTOGRAM_BOUNDS[bucket - 2]
    assert pipe.adds["P:m:wait", f"fn{US}sum_us"] == round(max(seconds, 0) * 1e6)


def test_observations_add_up_and_are_written_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tally, "FLUSH_S", 0.05)
    t = Tally(Keyspace("P"))
    assert not t.pending and not t.due()
    for seconds in (0.01, 0.01, 3):  # a bound itself is in its bucket (le)
        t.observe("duration", "fn", seconds)
    assert t.pending and not t.due()
    time.sleep(0.06)
    assert t.due()
    pipe = Pipe()
    t.write(pipe)
    assert pipe.adds == {("P:m:duration", f"fn{US}1"): 2, ("P:m:duration", f"fn{US}9"): 1,
                         ("P:m:duration", f"fn{US}sum_us"): 3_020_000}  # fmt: skip
    again = Pipe()
    t.write(again)
    assert again.adds == {} and not t.pending
