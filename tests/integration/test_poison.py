"""The poison found in review, on a live fleet: one message used to stop a Kafka partition for good (and, under
``gpufleet run``, the whole fleet). Now it is a dead letter, the messages behind it run, and a role that keeps
failing is restarted with backoff while the others go on serving."""

from __future__ import annotations

import os
import signal
import socket

import httpx
import orjson

from gpufleet.dev.services import free_port
from tests.harness import FleetHarness
from tests.strategies import dumps, nested


def test_poison_messages_are_dead_lettered_and_the_partition_goes_on(harness: FleetHarness) -> None:
    harness.start()
    poison = {
        "nesting_too_deep": dumps({"function": "echo", "payload": nested(300)}),  # passed orjson.loads, not dumps
        "bad_number": b'{"function": "echo", "payload": 99999999999999999999}',
        "bad_id": b'{"function": "echo", "payload": {}, "id": "trailing-newline\\n"}',
    }
    assert len(poison["nesting_too_deep"]) < 4096  # under max_payload_bytes: it reaches the parser
    harness.produce("requests", list(poison.values()))
    harness.send("echo", {"behind": "the poison"}, id="behind")
    [ok] = harness.records("success", 1)
    assert ok["key"] == "requests:behind"
    assert ok["value"]["responsePayload"]["echo"] == {"behind": "the poison"}
    dead = {r["headers"]["reason"]: r for r in harness.records("dlq", len(poison))}
    assert set(dead) == set(poison)
    for reason, original in poison.items():
        assert dead[reason]["raw"] == original
    assert "role exited" not in harness.log_text()  # the trigger never died


def test_a_role_that_keeps_failing_is_restarted_and_the_others_go_on(harness: FleetHarness) -> None:
    """The api role dies, and its port is taken before it comes back (`gpufleet run` refuses a taken port only when
    it starts): it fails at every restart, with growing backoff, and the other roles go on serving."""
    port = free_port()
    token = "pX3Ue1N6gM0vq9cR7tYbK2wZs8dHfLa4JiQoEnVyT5u"
    harness.write_config(api={"enabled": True, "port": port, "token": token})
    harness.start()
    harness.wait_for(lambda: '"event":"ready"' in harness.log_text(), what="the fleet ready")
    [api_pid] = [orjson.loads(line)["pid"] for line in harness.log_text().splitlines()
                 if '"role started"' in line and '"role":"api"' in line]  # fmt: skip
    os.kill(api_pid, signal.SIGKILL)
    squatter = socket.socket()
    try:
        harness.wait_for(lambda: _bound(squatter, port), timeout_s=10, what="the port, before the api role's restart")
        squatter.listen()
        harness.send("echo", {"while": "api fails"}, id="served")
        [ok] = harness.records("success", 1)
        assert ok["key"] == "requests:served"

        def api_failures() -> list[int]:
            lines = [
                orjson.loads(line) for line in harness.log_text().splitlines() if '"role exited; restarting"' in line
            ]
            return [f["failures_in_a_row"] for f in lines if f["role"] == "api"]

        harness.wait_for(lambda: len(api_failures()) >= 3, timeout_s=60, what="api restarted three times")
        assert api_failures()[:3] == [1, 2, 3]  # each restart waits longer: 1 s, 2 s, then 4 s
        assert harness.proc is not None and harness.proc.poll() is None  # `gpufleet run` is still up
    finally:
        squatter.close()
    # The port is free again: the next restart serves.
    health = f"http://127.0.0.1:{port}/healthz"

    def api_up() -> bool:
        try:
            return httpx.get(health, timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    harness.wait_for(api_up, timeout_s=90, what="the api to come back")


def _bound(sock: socket.socket, port: int) -> bool:
    try:
        sock.bind(("127.0.0.1", port))
    except OSError:
        return False
    return True
