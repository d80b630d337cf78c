"""Task ids nobody can squat (security review, item 1), against a real fleet: Kafka trigger, API and webhook.

Before: a Kafka producer could pick the id that a later ``Idempotency-Key`` invoke, or a later bucket event, would
get. The invoke then answered ``created: false`` and the producer's payload ran in its place; the bucket event
counted as a duplicate and never ran.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gpufleet.aws import ObjectEvent
from gpufleet.intake.ids import api_task_id
from gpufleet.registry.messages import MessageFactory
from gpufleet.registry.model import Enqueued, NewTask
from gpufleet.triggers.ingest import Ingest
from tests.harness import FleetHarness
from tests.integration.test_object_push import aws_record

API_TOKEN = "b7Hn2QxK9pLm4VzR8tWc3YdF6gJs1NaE5uPq0XoT"

HOOK_TOKEN = "Ue4Rk8Mw2Zp6Tq1Xv9Ls3Nc7Yb5Hd0Jf2Ga8Kt4S"


class Fleet:
    def __init__(self, harness: FleetHarness, client: httpx.Client) -> None:
        self.harness, self.client = harness, client

    def invoke(self, function: str, event: Any, key: str) -> httpx.Response:
        return self.client.post(f"/v1/functions/{function}/invocations", json=event,
                                headers={"Authorization": f"Bearer {API_TOKEN}", "Idempotency-Key": key})  # fmt: skip

    def hook(self, body: bytes) -> httpx.Response:
        return self.client.post("/v1/webhooks/minio", content=body,
                                headers={"Authorization": f"Bearer {HOOK_TOKEN}"})  # fmt: skip

    def state(self, task_id: str, *states: str) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            record = self.harness.registry.get(task_id)
            return record if record and record["state"] in states else None

        record: dict[str, Any] = self.harness.wait_for(reached, 60, what=f"{task_id} to be {states}")
        return record

    def squat(self, task_id: str, function: str = "typed") -> None:
        """A record made before ids were namespaced: the id another source computes, for another function."""
        fleet = self.harness.fleet()
        factory = MessageFactory(self.harness.prefix, 1.0)
        message = factory.build(task_id, fleet.functions[function], {"n": 3}, {"source": "legacy"})
        task = NewTask(message, "kafka:///s", "kafka:///f", 1, "legacy", time.time(), origin="trigger:legacy")
        assert self.harness.registry.enqueue_many([task]) == [Enqueued.CREATED]


@pytest.fixture(scope="module")
def fleet(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    from gpufleet.dev.services import free_port

    harness = FleetHarness(services, tmp_path_factory.mktemp("ids"))
    port = free_port()
    shared = f"kafka:///{harness.topic('shared')}"
    harness.write_config(
        triggers={
            "requests": {"source": f"kafka:///{harness.topic('requests')}"},
            "alpha": {"source": shared, "function": "echo"},  # two triggers read one topic
            "beta": {"source": shared, "function": "echo"},
            "minio": {"source": "webhook:///minio", "function": "echo", "token": HOOK_TOKEN},
        },
        api={"enabled": True, "port": port, "token": API_TOKEN},
    )
    harness.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            harness.wait_api(client)
            yield Fleet(harness, client)
    finally:
        harness.stop()


def _object(bucket: str, key: str) -> tuple[ObjectEvent, bytes]:
    record = aws_record(bucket, key, "image/jpeg")
    event = ObjectEvent(bucket=bucket, key=key, event_type="ObjectCreated:Put",
                        etag=record["s3"]["object"]["eTag"])  # fmt: skip
    return event, orjson.dumps({"Records": [record]})


def test_a_producer_cannot_take_the_id_of_a_later_invoke(fleet: Fleet) -> None:
    h = fleet.harness
    target = api_task_id("echo", f"order-{h.prefix}")
    h.send("typed", {"n": 2}, id=target)
    # The producer's task lives in its trigger's namespace, and runs as it asked.
    assert fleet.state(f"requests:{target}", "SUCCEEDED")["result"] == {"square": 4}
    r = fleet.invoke("echo", {"order": 1234}, f"order-{h.prefix}")
    assert r.status_code == 202 and r.json() == {"id": target, "created": True}, r.text
    assert fleet.state(target, "SUCCEEDED")["result"]["echo"] == {"order": 1234}
    assert h.runs(target) == 1
    again = fleet.invoke("echo", {"order": 1234}, f"order-{h.prefix}")
    assert again.status_code == 202 and again.json() == {"id": target, "created": False}


def test_a_producer_cannot_take_the_id_of_a_later_bucket_event(fleet: Fleet) -> None:
    h = fleet.harness
    event, body = _object(f"b-{h.prefix.lower()}", "photos/cat.jpg")
    target = event.task_id("echo")
    h.send("typed", {"n": 2}, id=target)
    fleet.state(f"requests:{target}", "SUCCEEDED")
    r = fleet.hook(body)
    assert r.status_code == 200 and r.json()["published"] == 1, r.text
    assert fleet.state(target, "SUCCEEDED")["result"]["echo"]["key"] == "photos/cat.jpg"


def test_an_id_that_exists_for_another_function_is_a_conflict_not_a_duplicate(fleet: Fleet) -> None:
    h = fleet.harness
    key = f"legacy-{h.prefix}"
    fleet.squat(api_task_id("echo", key))
    r = fleet.invoke("echo", {"x": 1}, key)
    assert r.status_code == 409 and r.json()["error"]["code"] == "id_conflict", r.text

    event, body = _object(f"c-{h.prefix.lower()}", "docs/report.jpg")
    fleet.squat(event.task_id("echo"))
    r = fleet.hook(body)
    assert r.status_code == 422 and r.json()["error"]["code"] == "id_conflict", r.text
    dead = h.wait_for(lambda: [d for d in h.records("dlq", 0, timeout_s=5) if d["headers"]["reason"] == "id_conflict"],
                      what="the id_conflict dead letter")  # fmt: skip
    assert dead[0]["raw"] == body and dead[0]["headers"]["trigger"] == "minio"
    assert h.registry.get(event.task_id("echo"))["function"] == "typed"  # the existing task is left alone


def test_two_triggers_on_one_topic_each_get_their_task(fleet: Fleet) -> None:
    h = fleet.harness
    h.produce("shared", [orjson.dumps({"id": "same-id", "n": 1})])
    for trigger in ("alpha", "beta"):
        assert fleet.state(f"{trigger}:same-id", "SUCCEEDED")["result"]["echo"] == {"id": "same-id", "n": 1}


def test_producer_ids_are_namespaced_by_their_trigger(services: Any, tmp_path: Path) -> None:
    h = FleetHarness(services, tmp_path)
    h.write_config(triggers={"orders": {"source": "kafka:///orders"}})
    fleet = h.fleet()
    ingest = Ingest(fleet, fleet.triggers["orders"], h.registry)
    try:
        from gpufleet.triggers.ingest import SourceMessage

        def task_id(body: dict[str, Any], headers: dict[str, bytes] | None = None) -> str:
            msg = SourceMessage(orjson.dumps(body), "kafka:orders/0/7", "kafka-orders-0-7", headers or {})
            [task] = ingest.parse(msg)
            return task.message.task_id

        assert task_id({"function": "echo", "payload": {}, "id": "api-squat"}) == "orders:api-squat"
        assert task_id({"function": "echo", "payload": {}, "id": 42}) == "orders:42"
        assert task_id({"function": "echo", "payload": {}}, {"gpufleet-id": b"s3-x"}) == "orders:s3-x"
        assert task_id({"function": "echo", "payload": {}}) == "orders:kafka-orders-0-7"
    finally:
        ingest.close()
