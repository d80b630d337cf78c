"""At ``level: debug`` the logs of a whole fleet carry no secret (security review, item 7).

The fleet runs on a Redis that requires a password, with planted S3 keys, API token, webhook token and HMAC secret.
It moves an object end to end (SQS notification, download, upload: SigV4 requests), answers the API and webhooks
(good and bad credentials), then every line it logged is searched for each secret.
"""

from __future__ import annotations

import hashlib
import hmac
import time
import types
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gpufleet.dev.services import S3Service, free_port, start_redis
from tests.harness import FleetHarness
from tests.s3util import s3_client, sqs_client

REDIS_PASSWORD = "PlantedRedisPw0x7Kq2Lm9Rt4Vz8Bn3"

ACCESS_KEY_ID = "AKIAPLANTEDKEY7Q2M9X"

SECRET_KEY = "PlantedS3Secret/k8Jq3Wm2Rx9Tz4Lp7Nv5Bc1Hd6"

API_TOKEN = "PlantedApiTok-G4hK9mQ2xR7vL3pZ8wN5bT1c"

HOOK_TOKEN = "PlantedHookTok-J6nB2vX9qM4kR8wT3zL7pC5d"

HMAC_SECRET = "PlantedHmacKey-Y3tF8mK2xQ9vR5nL7wB4pZ6c"

PLANTED = (REDIS_PASSWORD, ACCESS_KEY_ID, SECRET_KEY, API_TOKEN, HOOK_TOKEN, HMAC_SECRET)


@pytest.fixture
def locked_redis(tmp_path: Path) -> Iterator[str]:
    service, proc = start_redis(tmp_path / "redis", password=REDIS_PASSWORD)
    try:
        yield service.url
    finally:
        proc.kill()
        proc.wait()


def test_debug_logs_carry_no_secret(services: Any, moto: S3Service, locked_redis: str, tmp_path: Path) -> None:
    shared = types.SimpleNamespace(redis_url=locked_redis, kafka_bootstrap=services.kafka_bootstrap)
    harness = FleetHarness(shared, tmp_path)
    s3, sqs = s3_client(moto.url), sqs_client(moto.url)
    bucket = f"b-{harness.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    queue_url = sqs.create_queue(QueueName=f"q-{harness.prefix}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(Bucket=bucket, NotificationConfiguration={
        "QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]})  # fmt: skip
    port = free_port()
    triggers = {
        "bucket": {"source": f"sqs:///q-{harness.prefix}", "function": "objinfo", "wait_time_s": 1},
        "hook": {"source": "webhook:///hook", "function": "echo", "token": HOOK_TOKEN, "hmac_secret": HMAC_SECRET},
    }
    triggers["bucket"]["output"] = f"s3://{bucket}/outputs"
    keys = {"access_key_id": ACCESS_KEY_ID, "secret_access_key": SECRET_KEY}
    harness.write_config(
        triggers=triggers,
        s3={"endpoint_url": moto.url, "sqs_endpoint_url": moto.url, **keys},
        api={"enabled": True, "port": port, "token": API_TOKEN},
        logging={"level": "debug", "format": "json"},
    )
    harness.start()
    try:
        s3.put_object(Bucket=bucket, Key="in/photo.jpg", Body=b"pixels")
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            harness.wait_api(client)
            bearer = {"Authorization": f"Bearer {API_TOKEN}"}
            r = client.post("/v1/functions/echo/invocations", json={"x": 1}, headers=bearer)
            assert r.status_code == 202, r.text
            assert client.get(f"/v1/tasks/{r.json()['id']}", headers=bearer).status_code == 200
            assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {API_TOKEN}x"}).status_code == 401
            body = _notification(bucket)
            assert client.post("/v1/webhooks/hook", content=body,
                               headers={"Authorization": f"Bearer {HOOK_TOKEN}"}).status_code == 200  # fmt: skip
            stamp = str(int(time.time()))
            signature = (
                "sha256=" + hmac.new(HMAC_SECRET.encode(), f"{stamp}.".encode() + body, hashlib.sha256).hexdigest()
            )
            assert client.post("/v1/webhooks/hook", content=body, headers={"X-Gpufleet-Signature": signature,
                               "X-Gpufleet-Timestamp": stamp}).status_code == 200  # fmt: skip
            assert client.post("/v1/webhooks/hook", content=body,
                               headers={"Authorization": f"Basic {HOOK_TOKEN}"}).status_code == 401  # fmt: skip
        records = harness.records("success", 3, timeout_s=90)
        conditions = sorted(r["headers"]["condition"] for r in records)
        assert conditions.count("Success") >= 3, conditions
    finally:
        harness.stop()
    log = harness.log_text()
    lines = [orjson.loads(line) for line in log.splitlines() if line.startswith("{")]
    assert sum(line.get("level") == "debug" for line in lines) > 10, "the fleet did not log at debug"
    for secret in PLANTED:
        assert secret not in log, f"{secret[:12]}... is in the log"
    assert "Signature=" not in log and "X-Amz-Signature" not in log and "authorization" not in log.lower()


def _notification(bucket: str) -> bytes:
    obj = {"key": "hooked.jpg", "size": 1, "eTag": "abc123"}
    record = {"eventVersion": "2.0", "eventSource": "minio:s3", "eventName": "s3:ObjectCreated:Put",
              "s3": {"bucket": {"name": bucket}, "object": obj}}  # fmt: skip
    return orjson.dumps({"EventName": "s3:ObjectCreated:Put", "Key": f"{bucket}/hooked.jpg", "Records": [record]})
