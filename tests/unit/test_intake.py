"""Bad input never stops intake: every message becomes tasks, is ignored on purpose, or is a dead letter with a
reason. Hostile inputs found in review, then 10,000+ generated inputs per trigger kind, through the real intake
path (parse, validate, build, publish to Redis, dead letters acknowledged by Kafka)."""

from __future__ import annotations

import json

import pytest

from gpufleet.errors import EventError
from gpufleet.intake.events import MAX_DEPTH, check_event, decode_event
from tests.strategies import dumps, nested

FUZZ_BATCHES, FUZZ_BATCH = 200, 50  # 10,000 inputs per trigger kind

# CPU-bound: in two groups of one xdist worker each (make test), not all at once on 2 cores, where each took 3x as
# long and passed pytest-timeout's 180 s; two, as one group alone was the whole run's critical path.
FUZZ_A, FUZZ_B = pytest.mark.xdist_group("fuzzers-a"), pytest.mark.xdist_group("fuzzers-b")


def test_events_decoded_elsewhere_are_checked_the_same_way() -> None:
    """The HTTP API decodes JSON with the standard library, which keeps big integers and NaN: same rules."""
    for bad in (float("nan"), float("inf"), 2**64, [nested(MAX_DEPTH)]):
        with pytest.raises(EventError):
            check_event(bad)
    assert decode_event(b'{"a": [1, 2.5, "99999999999999999999999"]}') == {"a": [1, 2.5, "99999999999999999999999"]}
    with pytest.raises(EventError, match="bad_number"):
        decode_event(b'{"a": 123456789012345678901234}')


def test_deep_json_is_refused_before_it_is_walked() -> None:
    # The standard library would recurse on this; decode_event leaves it to orjson's own limit, and names it.
    for depth in (1_024, 1_025, 100_000):
        with pytest.raises(EventError, match="nesting_too_deep"):
            decode_event(b"[" * depth + b"]" * depth)
    assert json.loads(dumps(nested(10))) == nested(10)
