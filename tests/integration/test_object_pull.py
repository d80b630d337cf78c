"""Object triggers that pull: SQS (the AWS path, on moto) and polling (SeaweedFS), end to end; scratch safety."""

from __future__ import annotations

import hashlib
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import orjson

from gpufleet.dev.services import S3Service
from gpufleet.registry.store import Registry
from gpufleet.triggers.ingest import Ingest
from gpufleet.triggers.s3 import PollTrigger
from gpufleet.triggers.sqs import SqsTrigger
from tests.harness import FleetHarness, nonzero
from tests.s3util import s3_client, sqs_client


def s3_settings(service: S3Service, sqs: bool = False) -> dict[str, Any]:
    out = {"endpoint_url": service.url, "access_key_id": service.access_key, "secret_access_key": service.secret_key}
    return {**out, "sqs_endpoint_url": service.url} if sqs else out


def successes(h: FleetHarness, n: int, timeout_s: float = 90) -> dict[str, dict[str, Any]]:
    records = [r for r in h.records("success", n, timeout_s) if r["headers"]["condition"] == "Success"]
    return {r["value"]["responsePayload"]["key"]: r["value"] for r in records}


def make_bucket(s3: Any, h: FleetHarness) -> str:
    bucket = f"b-{h.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    return bucket


def test_sqs_path_put_object_gives_a_success_callback_with_outputs(harness: FleetHarness, moto: S3Service) -> None:
    s3, sqs = s3_client(moto.url), sqs_client(moto.url)
    bucket = make_bucket(s3, harness)
    queue_url = sqs.create_queue(QueueName=f"q-{harness.prefix}")["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    s3.put_bucket_notification_configuration(
        Bucket=bucket,
        NotificationConfiguration={"QueueConfigurations": [{"QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}]},
    )  # this also queues an s3:TestEvent, which the trigger must ignore
    trigger = {"source": f"sqs:///q-{harness.prefix}", "function": "objinfo", "prefix": "in/",
               "output": f"s3://{bucket}/outputs", "wait_time_s": 1}  # fmt: skip
    harness.write_config(
        triggers={"bucket": trigger},
        s3=s3_settings(moto, sqs=True),
    )
    harness.start()
    bodies = {"in/a b+c ü€.txt": b"hello", "in/../../etc/evil\x01.txt": b"escape attempt"}
    for key, body in bodies.items():
        s3.put_object(Bucket=bucket, Key=key, Body=body, ContentType="text/plain")
    s3.put_object(Bucket=bucket, Key="other/skipped.txt", Body=b"not under in/")
    # One multipart upload: moto sends ObjectCreated:Put and ObjectCreated:CompleteMultipartUpload for it.
    big = b"x" * (5 * 1024 * 1024 + 7)
    upload = s3.create_multipart_upload(Bucket=bucket, Key="in/big.bin")
    part = s3.upload_part(Bucket=bucket, Key="in/big.bin", UploadId=upload["UploadId"], PartNumber=1, Body=big)
    s3.complete_multipart_upload(Bucket=bucket, Key="in/big.bin", UploadId=upload["UploadId"],
                                 MultipartUpload={"Parts": [{"ETag": part["ETag"], "PartNumber": 1}]})  # fmt: skip
    bodies["in/big.bin"] = big

    done = successes(harness, 3)
    assert set(done) == set(bodies)
    for key, record in done.items():
        result, ctx = record["responsePayload"], record["responseContext"]
        assert result["sha256"] == hashlib.sha256(bodies[key]).hexdigest() and result["size"] == len(bodies[key])
        assert result["inside_scratch"] is True  # even for the key with ../ and a control character
        assert ctx["outputs"] == [result["report"]]
        report_key = result["report"].removeprefix(f"s3://{bucket}/")
        assert report_key.startswith("outputs/s3-") and report_key.endswith("/report.json")
        assert orjson.loads(s3.get_object(Bucket=bucket, Key=report_key)["Body"].read())["key"] == key
    assert done["in/a b+c ü€.txt"]["responsePayload"]["content_type"] == "text/plain"  # filled by a HEAD
    big_id = record_id(done["in/big.bin"])
    assert harness.runs(big_id) == 1  # two notifications, one upload, one run
    for record in done.values():  # every attempt's scratch directory is gone
        scratch = harness.redis.lrange(f"scratch:{record_id(record)}", 0, -1)
        assert scratch and not any(Path(p.decode()).exists() for p in scratch)
    assert harness.records("dlq", 0, timeout_s=3) == []  # the TestEvent and the filtered key are not dead letters
    attrs = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
    assert attrs["ApproximateNumberOfMessages"] == "0" and attrs["ApproximateNumberOfMessagesNotVisible"] == "0"


def record_id(record: dict[str, Any]) -> str:
    return str(record["requestContext"]["requestId"])


def test_sqs_messages_stay_hidden_while_a_publish_is_slow(harness: FleetHarness, moto: S3Service) -> None:
    """Redis is unreachable: the trigger keeps retrying the publish and keeps extending the message's visibility
    (5 s here), so no other consumer gets it; once Redis is back it publishes, then deletes the message."""
    s3, sqs = s3_client(moto.url), sqs_client(moto.url)
    bucket = make_bucket(s3, harness)
    queue_url = sqs.create_queue(QueueName=f"slow-{harness.prefix}")["QueueUrl"]
    event = {
        "Records": [
            {
                "eventVersion": "2.1",
                "eventSource": "aws:s3",
                "eventName": "ObjectCreated:Put",
                "s3": {"bucket": {"name": bucket}, "object": {"key": "in/x.txt", "size": 1, "eTag": "ab"}},
            }
        ]
    }
    sqs.send_message(QueueUrl=queue_url, MessageBody=orjson.dumps(event).decode())
    harness.write_config(triggers={"slow": {"source": f"sqs:///slow-{harness.prefix}", "function": "echo",
                                            "wait_time_s": 1, "visibility_timeout_s": 5}},
                         s3=s3_settings(moto, sqs=True))  # fmt: skip
    fleet = harness.fleet()
    down = Registry.from_url("redis://127.0.0.1:1/0", harness.prefix)  # nothing listens there
    trigger = SqsTrigger(fleet, fleet.triggers["slow"], Ingest(fleet, fleet.triggers["slow"], registry=down))
    stop = threading.Event()
    thread = threading.Thread(target=trigger.run, args=(stop,))
    thread.start()
    try:
        time.sleep(9)  # well past the 5 s visibility timeout
        assert sqs.receive_message(QueueUrl=queue_url, WaitTimeSeconds=0).get("Messages") is None
        trigger.ingest.registry = harness.registry  # Redis is back
        harness.wait_for(lambda: trigger.stats["published"] == 1, 30, "the publish")
        harness.wait_for(lambda: sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["All"])["Attributes"]
                         ["ApproximateNumberOfMessagesNotVisible"] == "0", 10, "the delete")  # fmt: skip
        assert nonzero(harness.registry.counts("echo")) == {"QUEUED": 1}
    finally:
        stop.set()
        thread.join(30)


def test_polling_runs_each_object_once_across_a_restart(harness: FleetHarness, seaweedfs: S3Service) -> None:
    s3 = s3_client(seaweedfs.url, seaweedfs.access_key, seaweedfs.secret_key)
    bucket = make_bucket(s3, harness)
    for i in range(5):
        s3.put_object(Bucket=bucket, Key=f"in/file-{i}.txt", Body=f"file {i}".encode())
    harness.write_config(triggers={"poll": {"source": f"s3://{bucket}/in/", "function": "objinfo",
                                            "output": f"s3://{bucket}/out", "poll_interval_s": 1}},
                         s3=s3_settings(seaweedfs))  # fmt: skip
    harness.start()
    assert len(successes(harness, 5)) == 5
    assert harness.stop() == 0
    for i in range(5, 7):  # written while the trigger is down: found by the next listing
        s3.put_object(Bucket=bucket, Key=f"in/file-{i}.txt", Body=f"file {i}".encode())
    harness.start()
    done = successes(harness, 7)
    assert sorted(done) == [f"in/file-{i}.txt" for i in range(7)]
    time.sleep(3)  # three more listings: nothing new, nothing again
    assert len(harness.records("success", 7, timeout_s=5)) == 7
    for record in done.values():
        assert harness.runs(record_id(record)) == 1
        assert record["responsePayload"]["event_type"] == "ObjectCreated:Listed"


def test_polling_pages_through_thousands_of_objects(harness: FleetHarness, seaweedfs: S3Service) -> None:
    s3 = s3_client(seaweedfs.url, seaweedfs.access_key, seaweedfs.secret_key)
    bucket = make_bucket(s3, harness)
    n = 1_100  # more than one 1,000-key page
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda i: s3.put_object(Bucket=bucket, Key=f"data/{i:05d}.json", Body=b"{}"), range(n)))
    harness.write_config(triggers={"poll": {"source": f"s3://{bucket}/data/", "function": "echo", "suffix": ".json"}},
                         s3=s3_settings(seaweedfs))  # fmt: skip
    fleet = harness.fleet()
    trigger = PollTrigger(fleet, fleet.triggers["poll"])
    client, stop = s3_client(seaweedfs.url, seaweedfs.access_key, seaweedfs.secret_key), threading.Event()
    try:
        assert trigger.poll_once(client, stop)
        assert trigger.stats["published"] == n and nonzero(harness.registry.counts("echo")) == {"QUEUED": n}
        assert trigger.poll_once(client, stop)  # nothing new
        assert trigger.stats["published"] == n and trigger.stats["duplicates"] == 0
        s3.delete_objects(Bucket=bucket, Delete={"Objects": [{"Key": f"data/{i:05d}.json"} for i in range(10)]})
        s3.put_object(Bucket=bucket, Key="data/00000.json", Body=b'{"changed": true}')  # new content: runs again
        assert trigger.poll_once(client, stop)
        assert trigger.stats["published"] == n + 1
        assert harness.redis.hlen(trigger.checkpoint) == n - 9  # deleted keys leave the checkpoint
    finally:
        trigger.ingest.close()
