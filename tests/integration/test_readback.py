"""``gpufleet tail`` and ``gpufleet redrive``, as real CLI processes against a running fleet and real Kafka."""

from __future__ import annotations

import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from gpufleet.aws import ObjectEvent
from gpufleet.control.plane import ControlPlane
from gpufleet.control.redrive import redrive
from gpufleet.dev.services import S3Service
from gpufleet.triggers.ingest import Ingest, SourceMessage
from tests.harness import FleetHarness
from tests.integration.test_object_pull import s3_settings
from tests.s3util import s3_client, sqs_client


@pytest.fixture
def fleet(harness: FleetHarness) -> Iterator[FleetHarness]:
    harness.start()
    yield harness
    harness.stop()


def cli(h: FleetHarness, *args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpufleet", *args, "--config", str(h.config)], env=h.env(),
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def test_redrive_resends_dead_letters_with_their_identity_once_the_cause_is_fixed(fleet: FleetHarness) -> None:
    h = fleet
    tight = {"requests": {"source": f"kafka:///{h.topic('requests')}", "max_payload_bytes": 80}}
    h.write_config(triggers=tight)
    h.stop()
    h.start()
    big = {"blob": "x" * 100}
    h.produce("requests", [orjson.dumps({"function": "echo", "payload": big, "id": "order-1"}),
                           orjson.dumps({"function": "echo", "payload": big}),
                           orjson.dumps({"function": "echo", "payload": {"small": 1}})])  # fmt: skip
    dead = h.records("dlq", 2)
    assert {d["headers"]["reason"] for d in dead} == {"oversize"} and len(dead) == 2
    for d in dead:  # the message's own default id, as its source says: kafka:<topic>/<partition>/<offset>
        assert d["headers"]["default_id"] == "kafka-" + d["headers"]["source"].removeprefix("kafka:").replace("/", "-")
    no_id = next(d for d in dead if "id" not in d["value"])

    # Not fixed yet: refused again, for the same reason, and said so (exit 1).
    out = cli(h, "redrive", "requests", "--json")
    assert out.returncode == 1 and out.stdout, out.stderr
    assert orjson.loads(out.stdout) | {"reasons": None} == {"trigger": "requests", "read": 2, "queued": 0,
        "duplicates": 0, "dead_lettered": 2, "ignored": 0, "reasons": None, "letters": [], "refused": []}  # fmt: skip
    assert orjson.loads(out.stdout)["reasons"] == {"oversize": 2}

    h.write_config(triggers={"requests": {**tight["requests"], "max_payload_bytes": 4096}})  # the fix
    # A dry run lists each letter it would send, with its reason and detail, and commits nothing: twice the same.
    for _ in range(2):
        dry = cli(h, "redrive", "requests", "--reason", "oversize", "--dry-run")
        assert dry.returncode == 0 and "2 dead letters of trigger requests (oversize)" in dry.stdout, dry.stdout
        rows = [line for line in dry.stdout.splitlines() if f"{h.topic('dlq')}/" in line]
        assert len(rows) == 2 and all(" oversize " in r and "kafka:" in r and "bytes" in r for r in rows), dry.stdout
    out = cli(h, "redrive", "requests", "--json")
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    # The two new letters of the redrive before, not the two first ones it had handled already.
    assert (report["read"], report["queued"], report["duplicates"], report["dead_lettered"]) == (2, 2, 0, 0)
    ids = ["requests:order-1", f"requests:{no_id['headers']['default_id']}"]
    registry = h.registry
    h.wait_for(lambda: all((registry.get(i) or {}).get("state") == "SUCCEEDED" for i in ids), what="redriven tasks")
    # Redriven again: nothing is read again, nothing new runs.
    again = orjson.loads(cli(h, "redrive", "requests", "--json").stdout)
    assert (again["read"], again["queued"], again["dead_lettered"]) == (0, 0, 0)
    assert [h.runs(i) for i in ids] == [1, 1]
    unknown = cli(h, "redrive", "nope")
    assert unknown.returncode == 1 and "no trigger 'nope'" in unknown.stderr


def test_a_message_that_stays_bad_is_dead_lettered_once_per_redrive_never_doubled(fleet: FleetHarness) -> None:
    """Five redrives of two still-oversize messages: two new letters each time (before: 2, 4, 8, 16, 32). A letter
    of another reason, left out by --reason, is still there for a later redrive."""
    h = fleet
    h.write_config(triggers={"requests": {"source": f"kafka:///{h.topic('requests')}", "max_payload_bytes": 80}})
    h.stop()
    h.start()
    big = orjson.dumps({"function": "echo", "payload": {"blob": "x" * 100}})
    h.produce("requests", [big, big.replace(b"}}", b', "more": 1}}')])
    assert len(h.records("dlq", 2)) == 2
    h.produce("requests", [b"{oops"])
    assert len(h.records("dlq", 3)) == 3
    for k in range(1, 6):
        report = orjson.loads(cli(h, "redrive", "requests", "--reason", "oversize", "--json").stdout)
        assert (report["read"], report["dead_lettered"]) == (2, 2), (k, report)
        letters = h.records("dlq", 3 + 2 * k)
        assert len(letters) == 3 + 2 * k, (k, len(letters))
    rest = orjson.loads(cli(h, "redrive", "requests", "--json").stdout)
    assert rest["read"] == 3 and rest["reasons"] == {"oversize": 2, "malformed_json": 1}, rest


def test_redrive_sends_only_the_fleets_own_signed_dead_letters(harness: FleetHarness) -> None:
    """The review's probe: anybody who can write to the dead-letter topic forged a record that became task
    ``requests:forged-1``, and an object event that made the worker download ``privatebucket/secret.txt``."""
    h = harness
    h.write_config()
    fleet = h.fleet()
    ingest = Ingest(fleet, fleet.triggers["requests"])
    try:  # a real dead letter, signed by the trigger's intake
        batch = ingest.prepare([SourceMessage(b'{"function": "echo", "payload": ', "kafka:requests/0/7", "real-7")])
        assert ingest.publish(batch, threading.Event()) is not None
    finally:
        ingest.close()
    [real] = h.records("dlq", 1)
    assert real["headers"]["signature"].startswith("v1=")
    forged = {"trigger": "requests", "reason": "unknown_function", "source": "kafka:requests/0/9"}
    obj = ObjectEvent(bucket="privatebucket", key="secret.txt", event_type="ObjectCreated:Put", size=1, etag="e")
    for value, headers in (
        (b'{"function": "echo", "payload": {}, "id": "forged-1"}', forged | {"default_id": "forged-1"}),
        (obj.model_dump_json().encode(), forged | {"object_event": "true", "default_id": "forged-2"}),
        # The real letter's signature on other ids: changed after signing.
        (real["raw"], real["headers"] | {"default_id": "forged-3"}),
    ):
        h.produce("dlq", [value], headers=[(k, v.encode()) for k, v in headers.items()])
    h.records("dlq", 4)

    out = cli(h, "redrive", "requests")
    assert out.returncode == 1, out.stdout + out.stderr
    assert "3 not sent: this fleet did not sign them" in out.stdout, out.stdout
    lines = [line for line in out.stdout.splitlines() if f"{h.topic('dlq')}/" in line]
    assert sorted(line.split()[1] for line in lines) == ["forged", "unsigned", "unsigned"], out.stdout
    assert "refused again 1 (malformed_json: 1)" in out.stdout  # the real one was sent, and is still malformed
    registry = h.registry
    assert registry.get("requests:forged-1") is None and registry.counts("echo").get("QUEUED", 0) == 0
    assert not [k for k in h.redis.scan_iter(f"{h.prefix}:task:s3-*")]  # no download was ever queued

    # An operator who knows where a letter came from (written before letters were signed) can send it anyway.
    h.produce("dlq", [b'{"function": "echo", "payload": {}, "id": "old-1"}'],
              headers=[(k, v.encode()) for k, v in (forged | {"default_id": "old-1"}).items()])  # fmt: skip
    report = redrive(fleet, "requests", accept_unsigned=True)
    assert (report.read, report.queued, report.refused) == (2, 1, [])  # and the real one's new letter, refused again
    assert registry.get("requests:old-1") is not None


def test_tail_follows_records_live_and_filters_them(fleet: FleetHarness) -> None:
    h = fleet
    cmd = [sys.executable, "-m", "gpufleet", "tail", "--json", "--count", "3", "--config", str(h.config)]
    tail = subprocess.Popen(cmd, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None
        line = tail.stderr.readline()
        assert "gpufleet: following" in line, line + tail.stderr.read()
        h.send("echo", {"n": 1}, id="t-1")
        h.send("always_fail", {"n": 2}, id="t-2")
        h.produce("requests", [b"{oops"])
        out, _ = tail.communicate(timeout=90)
    finally:
        tail.kill()
    records: list[dict[str, Any]] = [orjson.loads(line) for line in out.splitlines()]
    kinds = sorted((r["kind"], r["key"] if r["kind"] != "dead_letter" else r["headers"]["reason"]) for r in records)
    assert kinds == [("dead_letter", "malformed_json"), ("failure", "requests:t-2"), ("success", "requests:t-1")]
    success = next(r for r in records if r["kind"] == "success")
    assert success["value"]["responsePayload"]["echo"] == {"n": 1}
    # From the beginning, one function's records only, in the human form.
    only = cli(h, "tail", "--from-beginning", "--function", "always_fail", "--count", "1")
    assert only.returncode == 0 and "requests:t-2 function=always_fail condition=RetriesExhausted" in only.stdout
    # The line ends with the error, not the record's boilerplate; a success's with its result.
    assert "attempts=3  ValueError: boom on attempt 3" in only.stdout and "requestContext" not in only.stdout
    ok = cli(h, "tail", "--from-beginning", "--function", "echo", "--count", "1")
    assert (
        ok.returncode == 0 and '-> {"echo":{"n":1},"attempt":1}' in ok.stdout and "requestContext" not in ok.stdout
    ), ok.stdout


def test_an_unreachable_kafka_is_one_line_and_exit_4(harness: FleetHarness) -> None:
    from gpufleet.dev.services import free_port

    harness.write_config(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    out = cli(harness, "tail", timeout=60)
    assert out.returncode == 4, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Kafka at 127.0.0.1:" in lines[0] and "kafka.bootstrap_servers" in lines[0]


def test_tail_says_once_that_kafka_went_away_and_follows_again_when_it_is_back(harness: FleetHarness) -> None:
    """A Kafka of its own, stopped and started again on its port while tail follows: one line when it goes, one
    when it is back, no traceback, and the record written after the restart is shown."""
    from kafka import KafkaProducer

    from gpufleet.dev.services import free_port, start_kafka, stop

    port = free_port()
    _, kafka = start_kafka(harness.dir / "kafka", port)
    harness.write_config(kafka={"bootstrap_servers": f"127.0.0.1:{port}"})
    topic = harness.topic("success")

    def produce(value: bytes) -> None:
        producer = KafkaProducer(bootstrap_servers=f"127.0.0.1:{port}", acks="all")
        producer.send(topic, value, key=b"requests:k", headers=[("function", b"echo"), ("condition", b"Success")])
        producer.flush()
        producer.close()

    cmd = [sys.executable, "-m", "gpufleet", "tail", "--success", "--json", "--count", "2", "--config",
           str(harness.config)]  # fmt: skip
    tail = subprocess.Popen(cmd, env=harness.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None and tail.stdout is not None
        assert "gpufleet: following" in tail.stderr.readline()
        produce(b'{"n": 1}')
        assert orjson.loads(tail.stdout.readline())["value"] == {"n": 1}
        stop(kafka)
        assert "gpufleet: lost Kafka" in tail.stderr.readline()
        _, kafka = start_kafka(harness.dir / "kafka", port)  # in memory: the topic is gone, then made again
        assert "Kafka is back" in tail.stderr.readline()
        produce(b'{"n": 2}')
        out, err = tail.communicate(timeout=60)
    finally:
        tail.kill()
        stop(kafka)
    assert tail.returncode == 0 and orjson.loads(out)["value"] == {"n": 2}
    assert "Traceback" not in err and "lost Kafka" not in err, err


def test_tail_follows_s3_and_sqs_destinations_and_names_those_it_cannot_read(harness: FleetHarness,
                                                                            moto: S3Service) -> None:  # fmt: skip
    """Success records to an S3 prefix, failure records to an SQS queue, one trigger's failures to SNS: tail
    shows both records, each read back where it landed, says it cannot follow SNS, and leaves the queue's
    message for its consumers."""
    h = harness
    s3, sqs = s3_client(moto.url), sqs_client(moto.url)
    bucket = f"tail-{h.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    queue = sqs.create_queue(QueueName=f"tail-{h.prefix}")["QueueUrl"]
    h.write_config(s3=s3_settings(moto, sqs=True), triggers={"requests": {
        "source": f"kafka:///{h.topic('requests')}", "on_failure": "sns:///arn:aws:sns:us-east-1:123456789012:failed"}},
        defaults={"on_success": f"s3://{bucket}/records", "on_failure": f"sqs:///tail-{h.prefix}"})  # fmt: skip
    h.start()
    cmd = [sys.executable, "-m", "gpufleet", "tail", "--success", "--failure", "--json", "--count", "2", "--config",
           str(h.config)]  # fmt: skip
    tail = subprocess.Popen(cmd, env=h.env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert tail.stderr is not None
        said = [tail.stderr.readline(), tail.stderr.readline()]
        assert "not followed" in said[0] and "sns:///arn:aws:sns:us-east-1:123456789012:failed" in said[0], said
        assert f"following s3://{bucket}/records, sqs:///tail-{h.prefix}" in said[1], said
        control = ControlPlane(h.fleet())
        control.invoke("echo", orjson.dumps({"n": 1}), "tail-ok")
        control.invoke("always_fail", orjson.dumps({"n": 2}), "tail-bad")  # its records go by the defaults
        out, _ = tail.communicate(timeout=90)
    finally:
        tail.kill()
        h.stop()
    records = {r["kind"]: r for r in map(orjson.loads, out.splitlines())}
    assert records["success"]["where"] == f"s3://{bucket}/records", records
    assert records["success"]["value"]["responsePayload"]["echo"] == {"n": 1}
    assert records["failure"]["where"] == f"sqs:///tail-{h.prefix}"
    assert records["failure"]["headers"]["condition"] == "RetriesExhausted"
    left = sqs.receive_message(QueueUrl=queue, MaxNumberOfMessages=10, WaitTimeSeconds=1).get("Messages", [])
    assert len(left) == 1, "tail took the queue's message from its consumers"
