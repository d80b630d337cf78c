"""Delivery never wedges: a record a destination refuses for good is parked, visible and re-sendable, and the records
behind it are delivered. Records are kept within max_record_bytes, so an accepted event cannot make one too large."""

from __future__ import annotations

import subprocess
import sys
import threading

import orjson
import pytest

from gpufleet.control.plane import ControlPlane
from gpufleet.errors import ConfigError
from gpufleet.triggers.ingest import Ingest, SourceMessage
from tests.harness import FleetHarness


def callback(h: FleetHarness, key: str, value: bytes, dest: str | None = None) -> None:
    """A record as a worker's finish writes it to the callback stream."""
    h.redis.xadd(f"{h.prefix}:callbacks", {"dest": dest or f"kafka:///{h.topic('success')}", "key": key,
                                           "value": value, "condition": "Success", "function": "echo"})  # fmt: skip


def test_a_refused_record_is_parked_and_the_records_behind_it_are_delivered(harness: FleetHarness) -> None:
    callback(harness, "before", b'{"n": 1}')
    callback(harness, "huge", b"x" * 1_500_000)  # over the producer's max_request_size (1 MiB): refused for good
    callback(harness, "nowhere", b"{}", dest="carrier-pigeon:///coop")  # a scheme no destination serves
    callback(harness, "after", b'{"n": 2}')
    harness.start("dispatcher")
    delivered = harness.records("success", 2)
    assert [r["key"] for r in delivered] == ["before", "after"]
    assert delivered[1]["headers"] == {"condition": "Success", "function": "echo"}

    plane = ControlPlane(harness.fleet())
    page = harness.wait_for(lambda: (p := plane.parked()) and p["total"] == 2 and p, what="two parked records")
    # Each destination parks on its own (gpufleet.delivery.flows): no order between the two.
    huge, nowhere = sorted(page["items"], key=lambda item: item["key"])
    assert huge["key"] == "huge" and "MessageSizeTooLargeError" in huge["reason"] and huge["bytes"] == 1_500_000
    assert huge["headers"] == {"condition": "Success", "function": "echo"}
    assert nowhere["key"] == "nowhere" and nowhere["reason"].startswith("bad destination")
    assert harness.redis.xlen(f"{harness.prefix}:callbacks") == 0  # nothing left pending behind them

    # Re-sent, they are refused again and park again, with nothing lost; dropped, they are gone.
    assert plane.resend_parked(None) == 2
    harness.wait_for(lambda: plane.parked()["total"] == 2 and harness.redis.xlen(f"{harness.prefix}:callbacks") == 0,
                     what="parked again")  # fmt: skip
    assert sorted(item["key"] for item in plane.parked()["items"]) == ["huge", "nowhere"]
    assert plane.drop_parked([item["id"] for item in plane.parked()["items"]]) == 2
    assert plane.parked()["total"] == 0


def test_a_parked_record_resent_after_the_fix_is_delivered(harness: FleetHarness) -> None:
    harness.write_config(kafka={"max_request_size": 65_536}, defaults={"max_record_bytes": 49_152})
    callback(harness, "big", orjson.dumps({"blob": "y" * 100_000}))
    harness.start("dispatcher")
    plane = ControlPlane(harness.fleet())
    harness.wait_for(lambda: plane.parked()["total"] == 1, what="parked")
    harness.stop()
    harness.write_config()  # the operator raises the limit back to Kafka's default, then re-sends
    harness.start("dispatcher")
    cli = [sys.executable, "-m", "gpufleet", "parked", "--resend-all", "--config", str(harness.config)]
    assert "re-sent 1" in subprocess.run(cli, env=harness.env(), capture_output=True, text=True, check=True).stdout
    [record] = harness.records("success", 1)
    assert record["key"] == "big" and len(record["raw"]) > 100_000
    assert plane.parked()["total"] == 0


def test_an_event_near_the_payload_limit_gives_a_record_within_the_record_limit(harness: FleetHarness) -> None:
    harness.write_config(defaults={"max_payload_bytes": 150_000, "max_record_bytes": 200_000})
    harness.start()
    blob = "z" * 140_000
    harness.send("echo", {"blob": blob}, id="near-limit")  # echo returns the event: twice the payload in all
    records = [r for r in harness.records("success", 1, timeout_s=120) if r["key"] == "requests:near-limit"]
    # At-least-once: a slow Kafka ack may deliver the record twice, but it is the same record.
    assert records and len({r["raw"] for r in records}) == 1, f"{len(records)} records\n{harness.log_text()[-4000:]}"
    record = records[0]
    body = record["value"]
    assert len(record["raw"]) <= 200_000
    assert body["responsePayload"]["echo"] == {"blob": blob}  # the result, whole
    marker = body["requestPayload"]
    assert marker["truncated"] is True and marker["originalBytes"] > 140_000 and len(marker["sha256"]) == 64
    assert marker["preview"].startswith('{"blob":"zzz')
    assert harness.registry.get("requests:near-limit")["result"]["echo"] == {"blob": blob}


def test_dead_letters_are_cut_to_the_record_limit_or_parked_and_intake_goes_on(harness: FleetHarness) -> None:
    ingest = Ingest(harness.fleet(), harness.fleet().triggers["requests"])
    try:
        big = b'{"function": "echo", "payload": "' + b"q" * 600_000 + b'"}'
        [letter] = ingest.prepare([SourceMessage(big, "kafka:t/0/1", "k")]).dead
        assert letter.headers["reason"] == "oversize" and letter.headers["truncated"] == "true"
        assert len(letter.value) == ingest.max_record_bytes and letter.headers["original_bytes"] == str(len(big))

        # A dead-letter destination that refuses a record for good (a broker whose message.max.bytes is lower
        # than ours): the letter is parked in Redis and the source may move on.
        ingest.max_record_bytes = 10_000_000
        bigger = big + b" " * 1_000_000  # over the producer's max_request_size
        batch = ingest.prepare([SourceMessage(bigger, "kafka:t/0/2", "k2"),
                                SourceMessage(b'{"function": "echo", "payload": 1}', "kafka:t/0/3", "k3")])  # fmt: skip
        stop = threading.Event()  # set only if publishing wedges: then publish gives None and the test fails
        timer = threading.Timer(60, stop.set)
        timer.start()
        result = ingest.publish(batch, stop)
        timer.cancel()
        assert result is not None and result.published == 1 and result.dead_lettered == 1
        [parked] = ControlPlane(harness.fleet()).parked()["items"]
        assert parked["key"] == "kafka:t/0/2" and parked["headers"]["reason"] == "oversize"
        assert parked["destination"] == f"kafka:///{harness.topic('dlq')}" and parked["bytes"] == len(bigger)
    finally:
        ingest.close()


def test_limits_that_could_make_an_undeliverable_record_are_config_errors(harness: FleetHarness) -> None:
    harness.write_config(defaults={"max_record_bytes": 1_048_576})
    with pytest.raises(ConfigError, match=r"max_record_bytes .* kafka.max_request_size"):
        harness.fleet()
    harness.write_config(defaults={"max_payload_bytes": 600_000})
    with pytest.raises(ConfigError, match=r"max_payload_bytes .*max_record_bytes"):
        harness.fleet()
    harness.write_config(triggers={"t": {"source": "kafka:///t", "max_payload_bytes": 600_000}})
    with pytest.raises(ConfigError, match="max_payload_bytes"):
        harness.fleet()
