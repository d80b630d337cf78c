"""Task ids nobody can squat (security review, item 1), against a real fleet: Kafka trigger, API and webhook.

Before: a Kafka producer could pick the id that a later ``Idempotency-Key`` invoke, or a later bucket event, would
get. The invoke then answered ``created: false`` and the producer's payload ran in its place; the bucket event
counted as a duplicate and never ran.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from gpufleet.aws import ObjectEvent
from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError
from gpufleet.intake.ids import api_task_id
from tests.unit.test_config import write


def test_each_function_gets_its_own_task_for_an_object_and_notifications_dedupe() -> None:
    event = ObjectEvent(bucket="b", key="k.jpg", event_type="ObjectCreated:Put", etag="e")
    assert event.task_id("thumbnail") != event.task_id("transcribe")
    assert event.task_id("thumbnail").startswith("s3-") and api_task_id("f", "k").startswith("api-")


@pytest.mark.parametrize("name", ["api-orders", "s3-uploads", "API-x", "S3-y", "has:colon"])
def test_trigger_names_cannot_reach_generated_ids(tmp_path: Path, name: str) -> None:
    path = write(tmp_path, {}, {name: {"source": "kafka:///t"}})
    with pytest.raises(ConfigError, match=r"reserved|letters") as err:
        load_fleet(path, env={})
    assert "name" in str(err.value)
