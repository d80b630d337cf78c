"""Object triggers that pull: SQS (the AWS path, on moto) and polling (SeaweedFS), end to end; scratch safety."""

from __future__ import annotations

import pytest

from gpufleet.aws import ObjectEvent, key_parts


@pytest.mark.parametrize(
    "key",
    ["../../etc/passwd", "/etc/passwd", "a/../../b", "..", "", "con\x00tr\x1fol\x7f", "a\\..\\..\\b", "./././x",
     "photos/2026/a b+1.jpg"],
)  # fmt: skip
def test_no_key_leaves_the_scratch_directory(key: str) -> None:
    parts = key_parts(key)
    assert parts and all(p not in ("", ".", "..") and "/" not in p and "\\" not in p for p in parts)
    assert not any(ord(c) < 32 or c == "\x7f" for p in parts for c in p)


def test_object_identity_is_the_task_id() -> None:
    put = ObjectEvent(bucket="b", key="k", event_type="ObjectCreated:Put", etag="e1")
    complete = put.model_copy(update={"event_type": "ObjectCreated:CompleteMultipartUpload"})
    assert put.task_id("f") == complete.task_id("f")
    assert put.task_id("f") != put.model_copy(update={"etag": "e2"}).task_id("f")
    assert put.task_id("f") != put.model_copy(update={"event_type": "ObjectRemoved:Delete"}).task_id("f")
    assert put.task_id("f") != put.task_id("g")  # each function that gets the object has a task of its own
