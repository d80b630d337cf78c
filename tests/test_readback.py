"""``gpufleet tail`` and ``gpufleet redrive``, as real CLI processes against a running fleet and real Kafka."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import orjson
import pytest

from tests.harness import FleetHarness


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
        "duplicates": 0, "dead_lettered": 2, "ignored": 0, "reasons": None}  # fmt: skip
    assert orjson.loads(out.stdout)["reasons"] == {"oversize": 2}

    h.write_config(triggers={"requests": {**tight["requests"], "max_payload_bytes": 4096}})  # the fix
    dry = cli(h, "redrive", "requests", "--reason", "oversize", "--dry-run")
    assert dry.returncode == 0 and "4 dead letters of trigger requests (oversize)" in dry.stdout, dry.stdout
    out = cli(h, "redrive", "requests", "--json")
    assert out.returncode == 0, out.stderr
    report = orjson.loads(out.stdout)
    # Four dead letters (two, refused twice), two events: the second copy of each is the same task.
    assert (report["read"], report["queued"], report["duplicates"], report["dead_lettered"]) == (4, 2, 2, 0)
    ids = ["requests:order-1", f"requests:{no_id['headers']['default_id']}"]
    registry = h.registry
    h.wait_for(lambda: all((registry.get(i) or {}).get("state") == "SUCCEEDED" for i in ids), what="redriven tasks")
    # Redriven again: nothing new runs.
    again = orjson.loads(cli(h, "redrive", "requests", "--json").stdout)
    assert (again["queued"], again["duplicates"]) == (0, 4)
    assert [h.runs(i) for i in ids] == [1, 1]
    unknown = cli(h, "redrive", "nope")
    assert unknown.returncode == 1 and "no trigger 'nope'" in unknown.stderr


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


def test_an_unreachable_kafka_is_one_line_and_exit_4(harness: FleetHarness) -> None:
    from gpufleet.dev.services import free_port

    harness.write_config(kafka={"bootstrap_servers": f"127.0.0.1:{free_port()}"})
    out = cli(harness, "tail", timeout=60)
    assert out.returncode == 4, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "cannot reach Kafka at 127.0.0.1:" in lines[0] and "kafka.bootstrap_servers" in lines[0]
