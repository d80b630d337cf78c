"""Each destination has its own flow (issue 25): one that is down, slow or refusing holds only its own records.

Against real servers: Redis, the Kafka-protocol broker, HTTP receivers (one refusing connections, one answering 503
slowly) and moto's SQS; the dispatcher runs as it does in ``gpufleet dispatcher``, in a thread of this process.
"""

from __future__ import annotations

import http.server
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, ClassVar

import orjson
import pytest

from gpufleet.api.metrics import exposition
from gpufleet.aws import make_client
from gpufleet.credentials import redact_url
from gpufleet.delivery.dispatcher import Dispatcher
from gpufleet.delivery.flows import flow_id
from gpufleet.delivery.parking import Parking
from gpufleet.dev.services import S3Service, free_port
from gpufleet.registry.keyspace import Keyspace
from gpufleet.registry.model import Callback, State
from tests.harness import FleetHarness
from tests.integration.test_cli_control import cli
from tests.integration.test_object_pull import s3_settings
from tests.integration.test_registry import enqueue

SECRET = "flow-test-secret-0123456789abcdefghijklmnop"


class _Hook(http.server.BaseHTTPRequestHandler):
    """A receiver: 204 and keeps the record, or (``slow``) answers 503 after a while."""

    got: ClassVar[list[tuple[str, bytes]]] = []
    slow: ClassVar[float] = 0.0

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if self.slow:
            time.sleep(self.slow)
            self.send_response(503)
        else:
            self.got.append((self.headers["X-Gpufleet-Task-Id"], body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class _SlowHook(_Hook):
    slow = 1.5


@contextmanager
def serving(handler: type[_Hook], port: int) -> Iterator[None]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield
    finally:
        server.shutdown()
        server.server_close()


def hook(port: int) -> str:
    return f"http://127.0.0.1:{port}/done#secret_env=FLOW_HOOK_SECRET&timeout_s=3"


def finish(harness: FleetHarness, task_id: str, *records: tuple[str, bytes]) -> None:
    """A task that ends with these records (destination, value), as a worker's finish writes them."""
    enqueue(harness, task_id)
    reg = harness.registry
    assert reg.claim(task_id, "QUEUED", "", "me/1/1/a", 30, "w", "g").ok
    callbacks = [Callback(dest, value, "Success") for dest, value in records]
    assert reg.finish(task_id, "me/1/1/a", State.SUCCEEDED, {}, callbacks)


@contextmanager
def dispatching(harness: FleetHarness, name: str = "d1") -> Iterator[Dispatcher]:
    dispatcher = Dispatcher(harness.fleet(), name=name)
    stop = threading.Event()
    thread = threading.Thread(target=dispatcher.run, args=(stop,))
    thread.start()
    try:
        yield dispatcher
    finally:
        stop.set()
        thread.join(timeout=60)
        assert not thread.is_alive()


def backlog(harness: FleetHarness, url: str) -> int:
    return int(harness.redis.xlen(Keyspace(harness.prefix).flow(flow_id(url))))


@pytest.fixture
def secret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLOW_HOOK_SECRET", SECRET)
    _Hook.got = []


def test_a_down_and_a_slow_destination_hold_only_their_own_records(harness: FleetHarness, secret: None) -> None:
    """Before flows, the dispatcher retried the first failing destination for ever and delivered nothing else."""
    harness.write_config(dispatcher={"retry_backoff_s": 0.2, "retry_backoff_max_s": 1, "batch_max": 10})
    down_port, slow_port = free_port(), free_port()
    down, slow, kafka = hook(down_port), hook(slow_port), f"kafka:///{harness.topic('success')}"
    for i in range(30):  # each task has a record for each: the failing ones come first in the stream
        finish(harness, f"t{i}", (down, b'{"to":"down"}'), (slow, b'{"to":"slow"}'), (kafka, b'{"to":"kafka"}'))
    with serving(_SlowHook, slow_port), dispatching(harness) as dispatcher:
        assert sorted(r["key"] for r in harness.records("success", 30, timeout_s=30)) == sorted(
            f"t{i}" for i in range(30)
        )
        assert backlog(harness, down) == 30 and backlog(harness, slow) == 30
        state = harness.wait_for(
            lambda: (s := harness.redis.hgetall(Keyspace(harness.prefix).flow_state(flow_id(down))))
            and s[b"breaker"] == b"open" and s,
            what="the down destination's breaker to open",
        )  # fmt: skip
        assert b"ConnectError" in state[b"error"] and int(state[b"failures"]) >= 5
        # It comes back: every record it missed arrives, in order, none parked.
        with serving(_Hook, down_port):
            harness.wait_for(lambda: len(_Hook.got) == 30, timeout_s=30, what="the records the down one missed")
        assert sorted(key for key, _ in _Hook.got) == sorted(f"t{i}" for i in range(30))
        assert backlog(harness, down) == 0 and Parking(harness.redis, harness.prefix).count() == 0
        assert dispatcher.delivered == 60


def test_a_task_s_records_reach_a_destination_in_order_through_failures_and_a_takeover(
    harness: FleetHarness, secret: None
) -> None:
    harness.write_config(dispatcher={"retry_backoff_s": 0.1, "retry_backoff_max_s": 0.3, "claim_idle_s": 2})
    port = free_port()
    url = hook(port)
    for i in range(12):  # three tasks, four records each (a task retried by hand sends one each time it ends)
        harness.redis.xadd(
            f"{harness.prefix}:callbacks",
            {
                "dest": url,
                "key": f"o{i % 3}",
                "condition": "Success",
                "function": "echo",
                "value": orjson.dumps({"seq": i}),
            },
        )
    # The first dispatcher routes them and fails to deliver (nothing listens), then is stopped.
    with dispatching(harness, "first"):
        harness.wait_for(lambda: backlog(harness, url) == 12, what="the records in their flow")
    with serving(_Hook, port), dispatching(harness, "second"):
        harness.wait_for(lambda: len(_Hook.got) == 12, what="every record")
    for task in range(3):  # a webhook posts a batch's records at once, but one task's one after the other
        seqs = [orjson.loads(body)["seq"] for key, body in _Hook.got if key == f"o{task}"]
        assert seqs == list(range(task, 12, 3)), _Hook.got


def test_a_record_older_than_max_delivery_age_is_parked_with_why(harness: FleetHarness, secret: None) -> None:
    harness.write_config(dispatcher={"retry_backoff_s": 0.2, "retry_backoff_max_s": 0.5, "max_delivery_age_s": 1.5})
    url = hook(free_port())  # nothing listens there
    shown = redact_url(url)
    finish(harness, "old-1", (url, b'{"a":1}'))
    parking = Parking(harness.redis, harness.prefix)
    with dispatching(harness):
        harness.wait_for(lambda: parking.count() == 1, what="the record to be parked")
    [entry] = parking.entries()
    assert entry["key"] == "old-1" and entry["destination"] == shown
    assert "max_delivery_age_s" in entry["reason"] and "ConnectError" in entry["reason"]
    assert backlog(harness, url) == 0


def test_a_batch_refused_whole_for_one_record_parks_that_record_alone(harness: FleetHarness, moto: S3Service) -> None:
    """A queue that takes messages of 1 KiB at most: SQS refuses a whole batch with one larger message in it."""
    harness.write_config(s3=s3_settings(moto, sqs=True))
    sqs = make_client("sqs", harness.fleet().settings.s3, max_attempts=1)
    name = f"small-{harness.prefix}"
    queue_url = sqs.create_queue(QueueName=name, Attributes={"MaximumMessageSize": "1024"})["QueueUrl"]
    url = f"sqs:///{name}"
    for i in range(7):
        finish(harness, f"b{i}", (url, orjson.dumps({"i": i, "pad": "x" * (2000 if i == 4 else 10)})))
    parking = Parking(harness.redis, harness.prefix)
    with dispatching(harness) as dispatcher:
        harness.wait_for(lambda: dispatcher.delivered == 6 and parking.count() == 1, what="6 delivered, 1 parked")
    [entry] = parking.entries()
    assert entry["key"] == "b4" and "InvalidParameterValue" in entry["reason"]
    got: list[int] = []
    while len(got) < 6:
        reply = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        got += [orjson.loads(m["Body"])["i"] for m in reply.get("Messages", [])]
    assert sorted(got) == [0, 1, 2, 3, 5, 6]


def test_no_secret_in_a_destination_url_leaves_the_process(harness: FleetHarness, secret: None) -> None:
    """Passwords and secret query values in destination URLs, through failing deliveries then parking: not in the
    dispatcher's log, the parked listing (CLI and its JSON), metrics, nor the flows' state."""
    harness.write_config(dispatcher={"retry_backoff_s": 0.1, "retry_backoff_max_s": 0.3, "max_delivery_age_s": 2})
    port, planted = free_port(), "pl4nted-s3cret"
    urls = [f"amqp://app:{planted}@127.0.0.1:{port}/vh",
            f"http://app:{planted}@127.0.0.1:{port}/h?token={planted}&team=ml#secret_env=FLOW_HOOK_SECRET&timeout_s=1",
            f"https://127.0.0.1:{port}/h?sig={planted}#secret_env=FLOW_HOOK_SECRET&timeout_s=1"]  # fmt: skip
    for i, url in enumerate(urls):
        finish(harness, f"s{i}", (url, b"{}"))
    harness.start("dispatcher")
    parking = Parking(harness.redis, harness.prefix)
    harness.wait_for(lambda: parking.count() == 3, what="the three records parked")
    listed = cli(harness, "parked")
    outputs = {
        "log": (harness.dir / "fleet.log").read_text(),
        "parked": listed.stdout + listed.stderr,
        "parked --json": cli(harness, "parked", "--json").stdout,
        "metrics": exposition(harness.fleet(), harness.registry).decode(),
        "state": str([harness.redis.hgetall(Keyspace(harness.prefix).flow_state(flow_id(u))) for u in urls]),
    }
    assert all(planted not in text for text in outputs.values()), [k for k, v in outputs.items() if planted in v]
    assert "app:***@127.0.0.1" in outputs["log"] and "token=***&team=ml" in outputs["parked --json"]
    assert "sig=***" in outputs["metrics"]
    # What is parked keeps the URL as configured: re-sent, it goes where it was meant to.
    assert {e[1][b"dest"].decode() for e in harness.redis.xrange(f"{harness.prefix}:parked")} == set(urls)


def test_records_a_router_read_and_left_pending_are_all_taken_over(harness: FleetHarness) -> None:
    """A dispatcher killed after reading three batches: the next router takes over every page of what it left."""
    harness.write_config(dispatcher={"batch_max": 10})
    kafka = f"kafka:///{harness.topic('success')}"
    stream = f"{harness.prefix}:callbacks"
    Dispatcher(harness.fleet(), name="setup")._ensure_group()
    for i in range(25):
        harness.redis.xadd(stream, {"dest": kafka, "key": f"p{i}", "value": b"{}", "condition": "Success",
                                    "function": "echo"})  # fmt: skip
    for _ in range(3):  # read, never routed: pending under a consumer that is gone
        harness.redis.xreadgroup("dispatchers", "killed-router", {stream: ">"}, count=10)
    assert harness.redis.xpending(stream, "dispatchers")["pending"] == 25
    with dispatching(harness):
        keys = sorted(r["key"] for r in harness.records("success", 25))
    assert keys == sorted(f"p{i}" for i in range(25))
    assert harness.redis.xpending(stream, "dispatchers")["pending"] == 0


def test_an_entry_gpufleet_did_not_write_is_parked_and_the_next_delivered(harness: FleetHarness) -> None:
    kafka = f"kafka:///{harness.topic('success')}"
    stream = f"{harness.prefix}:callbacks"
    harness.redis.xadd(stream, {"dest": kafka, "key": "bad", "value": b"{}", "headers": b"not json"})
    harness.redis.xadd(stream, {"dest": kafka, "key": "good", "value": b"{}", "condition": "Success",
                                "function": "echo"})  # fmt: skip
    parking = Parking(harness.redis, harness.prefix)
    with dispatching(harness):
        assert [r["key"] for r in harness.records("success", 1)] == ["good"]
        harness.wait_for(lambda: parking.count() == 1, what="the unreadable entry parked")
    [entry] = parking.entries()
    assert entry["key"] == "bad" and entry["reason"] == "unreadable"
