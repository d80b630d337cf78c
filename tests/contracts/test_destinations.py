"""DestinationContract: what every destination promises, run against each one on a real server (kombu's
``t/integration/common.py`` is the model). A subclass says how to open the destination, read what arrived, and take
its server down and back up.
"""

from __future__ import annotations

import hashlib
import hmac
import http.server
import os
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, ClassVar

import orjson
import pytest

from gpufleet.aws import make_client
from gpufleet.destinations import open_destination, open_reader, parse_destination
from gpufleet.destinations.base import Destination, Landed, OutRecord
from gpufleet.destinations.http import SIGNATURE_HEADER, TIMESTAMP_HEADER
from gpufleet.destinations.memory import MemoryDestination
from gpufleet.dev.objectstores import start_moto
from gpufleet.dev.rabbitmq import start_rabbitmq
from gpufleet.dev.services import MOTO_ACCESS_KEY, MOTO_SECRET_KEY, free_port, start_kafka, stop
from gpufleet.errors import ConfigError, DeliveryError
from gpufleet.settings import FleetSettings
from tests.conftest import require_rabbitmq
from tests.harness import FleetHarness

pytestmark = pytest.mark.server  # every backend's own server, started here

HOOK_SECRET = "Rk3Wq8Zt1Lm6Xv9Pb4Nc7Hd2Jf5Gs0Ya3Ue8Mn"
Received = tuple[str, bytes, dict[str, str]]  # key, value, headers


def batch(n: int, tag: str = "") -> list[OutRecord]:
    tag = tag or uuid.uuid4().hex[:8]
    headers = {"condition": "Success", "function": "f", "traceparent": f"00-{uuid.uuid4().hex}-b7ad6b7169203331-01"}
    return [OutRecord(key=f"t-{tag}-{i}", value=b'{"i": %d}' % i, headers=headers) for i in range(n)]


def deliver_until_done(dest: Destination, records: list[OutRecord], timeout_s: float = 60) -> None:
    """What the dispatcher does: the whole batch again, with a pause, until it is delivered."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            assert dest.deliver(records) == []
            return
        except DeliveryError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


class DestinationContract:
    """Subclasses provide :meth:`open`, :meth:`received`, :meth:`down` and :meth:`up`."""

    def open(self) -> Destination:
        raise NotImplementedError

    def received(self) -> list[Received]:
        raise NotImplementedError

    def down(self) -> None:
        raise NotImplementedError

    def up(self) -> None:
        raise NotImplementedError

    def keys(self) -> list[str]:
        return [key for key, _, _ in self.received()]

    def test_records_are_keyed_by_task_id(self) -> None:
        dest = self.open()
        try:
            records = batch(3)
            assert dest.deliver(records) == []
            got = {key: (value, headers) for key, value, headers in self.received()}
            for r in records:
                assert got[r.key][0] == r.value
                assert got[r.key][1].get("condition") == "Success" and got[r.key][1].get("function") == "f"
        finally:
            dest.close()

    def test_a_batch_is_delivered_all_or_nothing(self) -> None:
        """deliver() returns only once every record is there; when it raises, the caller sends the whole batch
        again (records that made it are then there twice, under one key: consumers de-duplicate on it)."""
        dest = self.open()
        try:
            records = batch(40)
            assert dest.deliver(records) == []
            keys = self.keys()
            assert all(keys.count(r.key) == 1 for r in records), keys
        finally:
            dest.close()

    def test_a_down_server_is_retriable_and_the_batch_arrives_once_it_is_back(self) -> None:
        dest = self.open()
        try:
            self.down()
            records = batch(10)
            try:
                with pytest.raises(DeliveryError):
                    dest.deliver(records)
            finally:
                self.up()
            deliver_until_done(dest, records)
            assert {r.key for r in records} <= set(self.keys())
        finally:
            dest.close()


class ReadBackContract:
    """What every reader promises (gpufleet tail): it shows what its destination delivered, with its key, headers and
    value, and takes nothing from the consumers downstream. Subclasses provide :meth:`target`."""

    def target(self) -> tuple[str, FleetSettings]:
        raise NotImplementedError

    def open(self) -> Destination:
        return open_destination(*self.target())

    def follow(self, from_beginning: bool) -> list[Landed]:
        """Start a reader in a thread of its own; what it reads lands in the list returned."""
        reader = open_reader(*self.target())
        assert reader is not None
        got: list[Landed] = []
        stop, ready = threading.Event(), threading.Event()

        def collect() -> None:
            try:
                for landed in reader.follow(stop, from_beginning, ready.set):
                    got.append(landed)
            except Exception:
                if not stop.is_set():  # the server going away at teardown is no failure
                    raise

        thread = threading.Thread(target=collect, daemon=True)
        thread.start()
        assert ready.wait(30), "the reader never got ready"
        self.readers = [*getattr(self, "readers", []), (reader, stop, thread)]
        return got

    @pytest.fixture(autouse=True)
    def _stop_readers(self) -> Iterator[None]:
        yield
        for reader, done, thread in getattr(self, "readers", []):
            done.set()
            thread.join(10)
            reader.close()

    def test_what_was_delivered_is_read_back_and_left_for_the_consumers(self) -> None:
        records, history = batch(3), open_reader(*self.target()).history  # type: ignore[union-attr]
        dest = self.open()
        try:
            if history:
                assert dest.deliver(records) == []
            got = self.follow(from_beginning=True)
            if not history:  # a copy of what is published from now on
                assert dest.deliver(records) == []
        finally:
            dest.close()
        wait_until(lambda: len({g.key for g in got}) >= 3, "the records read back")
        by_key = {g.key: g for g in got}
        for r in records:
            assert by_key[r.key].value == r.value and by_key[r.key].headers["condition"] == "Success"
            assert by_key[r.key].headers["function"] == "f" and by_key[r.key].timestamp > time.time() - 120
        assert {r.key for r in records} <= set(self.keys())  # the consumers' copies are all still there

    def test_from_the_end_only_what_lands_after(self) -> None:
        old, new = batch(2, "old"), batch(1, "new")
        dest = self.open()
        try:
            assert dest.deliver(old) == []
            got = self.follow(from_beginning=False)
            assert dest.deliver(new) == []
        finally:
            dest.close()
        wait_until(lambda: new[0].key in {g.key for g in got}, "the new record read back")
        time.sleep(1.5)  # a poll or two more: an old record would show by now
        assert {g.key for g in got} == {new[0].key}


def wait_until(condition: Callable[[], bool], what: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


# -- memory: the stub for fast tests -------------------------------------------------------------------------------


class TestMemory(DestinationContract):
    name: ClassVar[str] = f"contract-{uuid.uuid4().hex[:8]}"

    def open(self) -> Destination:
        return open_destination(f"memory:///{self.name}", FleetSettings())

    def received(self) -> list[Received]:
        return [(r.key, r.value, r.headers) for r in MemoryDestination.boxes.get(self.name, [])]

    def down(self) -> None:
        MemoryDestination.down.add(self.name)

    def up(self) -> None:
        MemoryDestination.down.discard(self.name)


# -- kafka: a broker of its own, stopped and started again on its port ---------------------------------------------


class ServerContract(DestinationContract):
    """A server of the class's own, on a fixed port, started once for the class (a Kafka, moto or RabbitMQ start
    takes seconds); each test gets names of its own (topics, buckets, queues) and makes them in :meth:`create`.
    ``down`` kills the server, ``up`` starts a fresh one on the same port (in memory, so it makes the test's names
    again): the tests after that one use the fresh server."""

    server: ClassVar[dict[str, Any]]

    @pytest.fixture(autouse=True, scope="class")
    @classmethod
    def _server(cls, tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
        cls.server = {"workdir": tmp_path_factory.mktemp("server"), "port": free_port(), "pids": []}
        starter = cls()  # start() and down() read the class's server
        starter._start()
        try:
            yield
        finally:
            starter.down()

    @pytest.fixture(autouse=True)
    def _names(self) -> None:
        self.name = f"contract-{uuid.uuid4().hex[:8]}"
        self.create()

    @property
    def port(self) -> int:
        return int(self.server["port"])

    def start(self, workdir: Path) -> list[int]:
        """Start the server on ``self.port``; return the PIDs to stop."""
        raise NotImplementedError

    def create(self) -> None:
        pass

    def down(self) -> None:
        for pid in self.server["pids"]:
            stop(pid)
        self.server["pids"] = []

    def _start(self) -> None:
        self.server["pids"] = self.start(self.server["workdir"] / f"server-{time.monotonic_ns()}")

    def up(self) -> None:
        self._start()
        self.create()


class TestKafka(ReadBackContract, ServerContract):
    @property
    def topic(self) -> str:
        return self.name

    def start(self, workdir: Path) -> list[int]:
        return [start_kafka(workdir, self.port)[1].pid]

    def target(self) -> tuple[str, FleetSettings]:
        settings = FleetSettings.model_validate({"kafka": {"bootstrap_servers": f"127.0.0.1:{self.port}",
                                                           "request_timeout_ms": 3000}})  # fmt: skip
        return f"kafka:///{self.topic}", settings

    def received(self) -> list[Received]:
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=f"127.0.0.1:{self.port}", enable_auto_commit=False)
        try:
            # A loaded machine's first metadata answer may come after partitions_for_topic gives up (fresh CI: an
            # empty answer for a topic just written to): ask again for a while before calling it empty.
            deadline, parts = time.monotonic() + 15, []
            while not parts and time.monotonic() < deadline:
                parts = [TopicPartition(self.topic, p) for p in consumer.partitions_for_topic(self.topic) or []]
                if not parts:
                    time.sleep(0.2)
            if not parts:
                return []
            consumer.assign(parts)
            consumer.seek_to_beginning(*parts)
            # Everything there, up to a second without a new record: a loaded machine's first fetch (after the
            # offset reset) has taken over the second this waited in all, and read nothing.
            out: list[Received] = []
            deadline, quiet_until = time.monotonic() + 15, float("inf")
            while time.monotonic() < min(deadline, quiet_until):
                for recs in consumer.poll(timeout_ms=100).values():
                    out += [(r.key.decode(), r.value, {k: v.decode() for k, v in r.headers}) for r in recs]
                    quiet_until = time.monotonic() + 1.0
            return out
        finally:
            consumer.close()


# -- http: a local receiver that checks every signature ------------------------------------------------------------


class _Receiver(http.server.BaseHTTPRequestHandler):
    got: ClassVar[list[Received]] = []
    refused: ClassVar[list[str]] = []
    answer: ClassVar[int] = 200

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["Content-Length"]))
        stamp = self.headers[TIMESTAMP_HEADER]
        signed = f"{stamp}.{self.headers['X-Gpufleet-Task-Id']}.".encode() + body  # the task id is signed too
        expected = "sha256=" + hmac.new(HOOK_SECRET.encode(), signed, hashlib.sha256).hexdigest()
        fresh = abs(time.time() - int(stamp)) < 300
        if not (hmac.compare_digest(self.headers[SIGNATURE_HEADER], expected) and fresh):
            self.refused.append(self.headers["X-Gpufleet-Task-Id"])
            self.send_response(401)
        elif self.answer != 200:
            self.send_response(self.answer)
        else:
            headers = {
                "condition": self.headers["X-Gpufleet-Condition"],
                "function": self.headers["X-Gpufleet-Function"],
                "traceparent": self.headers["traceparent"],  # the standard header, as it is
            }
            self.got.append((self.headers["X-Gpufleet-Task-Id"], body, headers))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class TestHttp(DestinationContract):
    @pytest.fixture(autouse=True)
    def _receiver(self, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
        monkeypatch.setenv("CONTRACT_HOOK_SECRET", HOOK_SECRET)
        _Receiver.got, _Receiver.refused, _Receiver.answer = [], [], 200
        self.port = free_port()
        self.server: Any = None
        self.up()
        try:
            yield
        finally:
            self.down()

    def url(self, variable: str = "CONTRACT_HOOK_SECRET") -> str:
        return f"http://127.0.0.1:{self.port}/hooks/done?team=ml#secret_env={variable}&timeout_s=2"

    def open(self) -> Destination:
        return open_destination(self.url(), FleetSettings())

    def received(self) -> list[Received]:
        return list(_Receiver.got)

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None

    def up(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), _Receiver)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def test_every_request_is_signed_and_the_receiver_refuses_a_wrong_secret(self, monkeypatch: pytest.MonkeyPatch
                                                                            ) -> None:  # fmt: skip
        monkeypatch.setenv("WRONG_SECRET", HOOK_SECRET[::-1])
        dest = open_destination(self.url("WRONG_SECRET"), FleetSettings())
        try:
            records = batch(2)
            refused = dest.deliver(records)
            assert [r.index for r in refused] == [0, 1] and refused[0].reason.startswith("HTTP 401")
            assert sorted(_Receiver.refused) == sorted(r.key for r in records) and not _Receiver.got
        finally:
            dest.close()

    @pytest.mark.parametrize(("status", "retried"), [(500, True), (503, True), (429, True), (408, True),
                                                      (400, False), (404, False), (410, False)])  # fmt: skip
    def test_5xx_is_retried_and_4xx_is_kept_with_its_reason(self, status: int, retried: bool) -> None:
        dest = self.open()
        _Receiver.answer = status
        try:
            if retried:
                with pytest.raises(DeliveryError, match=f"HTTP {status}"):
                    dest.deliver(batch(3))
            else:
                refused = dest.deliver(batch(3))
                assert len(refused) == 3 and all(r.reason.startswith(f"HTTP {status}") for r in refused)
        finally:
            dest.close()


# -- s3, sqs, sns: a moto server of their own, stopped and started again on its port -----------------------------


class AwsContract(ServerContract):
    def start(self, workdir: Path) -> list[int]:
        return [start_moto(workdir, self.port)[1].pid]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def settings(self) -> FleetSettings:
        return FleetSettings.model_validate({"s3": {
            "endpoint_url": self.endpoint, "sqs_endpoint_url": self.endpoint, "access_key_id": MOTO_ACCESS_KEY,
            "secret_access_key": MOTO_SECRET_KEY}})  # fmt: skip

    def client(self, service: str) -> Any:
        return make_client(service, self.settings().s3, max_attempts=1)


class TestS3(ReadBackContract, AwsContract):
    def create(self) -> None:
        self.client("s3").create_bucket(Bucket=self.name)

    def target(self) -> tuple[str, FleetSettings]:
        return f"s3://{self.name}/records", self.settings()

    def received(self) -> list[Received]:
        s3, out = self.client("s3"), []
        for obj in s3.list_objects_v2(Bucket=self.name, Prefix="records/").get("Contents", []):
            got = s3.get_object(Bucket=self.name, Key=obj["Key"])
            out.append((obj["Key"].removeprefix("records/").removesuffix(".json"), got["Body"].read(), got["Metadata"]))
        return out

    def test_a_missing_bucket_parks_the_records_with_the_reason(self) -> None:
        dest = open_destination(f"s3://{self.name}-missing/records", self.settings())
        try:
            refused = dest.deliver(batch(2))
            assert [r.index for r in refused] == [0, 1] and "NoSuchBucket" in refused[0].reason
        finally:
            dest.close()


class TestSqs(ReadBackContract, AwsContract):
    def create(self) -> None:
        self.client("sqs").create_queue(QueueName=self.name)

    def target(self) -> tuple[str, FleetSettings]:
        return f"sqs:///{self.name}", self.settings()

    def test_a_queue_with_a_redrive_policy_is_not_read(self) -> None:
        sqs = self.client("sqs")
        dlq = sqs.create_queue(QueueName=f"{self.name}-dlq")["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=dlq, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        policy = orjson.dumps({"deadLetterTargetArn": arn, "maxReceiveCount": "2"}).decode()
        sqs.create_queue(QueueName=f"{self.name}-guarded", Attributes={"RedrivePolicy": policy})
        reader = open_reader(f"sqs:///{self.name}-guarded", self.settings())
        assert reader is not None
        with pytest.raises(ConfigError, match="maxReceiveCount"):
            next(reader.follow(threading.Event(), True, lambda: None))

    def received(self) -> list[Received]:
        sqs = self.client("sqs")
        url = sqs.get_queue_url(QueueName=self.name)["QueueUrl"]
        out: list[Received] = []
        while batch := sqs.receive_message(QueueUrl=url, MaxNumberOfMessages=10, MessageAttributeNames=["All"],
                                           VisibilityTimeout=0, WaitTimeSeconds=0).get("Messages", []):  # fmt: skip
            for m in batch:
                attrs = {k: v["StringValue"] for k, v in m.get("MessageAttributes", {}).items()}
                out.append((attrs.pop("task_id"), m["Body"].encode(), attrs))
            sqs.delete_message_batch(QueueUrl=url, Entries=[{"Id": str(i), "ReceiptHandle": m["ReceiptHandle"]}
                                                              for i, m in enumerate(batch)])  # fmt: skip
        self.seen = getattr(self, "seen", []) + out  # received() is asked more than once: keep what was read
        return list(self.seen)

    def test_a_record_larger_than_sqs_takes_is_parked_and_the_rest_delivered(self) -> None:
        dest = self.open()
        try:
            records = [*batch(2), OutRecord(key="t-huge", value=b'"' + b"x" * 300_000 + b'"')]
            refused = dest.deliver(records)
            assert [r.index for r in refused] == [2] and "256 KiB" in refused[0].reason
            assert {r.key for r in records[:2]} <= set(self.keys())
        finally:
            dest.close()


class TestSns(AwsContract):
    """Records are read back through an SQS queue subscribed to the topic (raw delivery, as a consumer would)."""

    def create(self) -> None:
        sns, sqs = self.client("sns"), self.client("sqs")
        self.arn = sns.create_topic(Name=self.name)["TopicArn"]
        url = sqs.create_queue(QueueName=self.name)["QueueUrl"]
        queue_arn = sqs.get_queue_attributes(QueueUrl=url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        sns.subscribe(TopicArn=self.arn, Protocol="sqs", Endpoint=queue_arn,
                      Attributes={"RawMessageDelivery": "true"})  # fmt: skip

    def open(self) -> Destination:
        return open_destination(f"sns:///{self.arn}", self.settings())

    received = TestSqs.received


# -- amqp: a RabbitMQ of its own (Debian's rabbitmq-server; skipped without it, but not under CI=true) -------------


class TestAmqp(ReadBackContract, ServerContract):
    def start(self, workdir: Path) -> list[int]:
        require_rabbitmq()
        return start_rabbitmq(workdir, self.port)[1]

    def channel(self) -> Any:
        import amqp

        conn = amqp.Connection(f"127.0.0.1:{self.port}", userid="guest", password="guest")
        conn.connect()
        return conn, conn.channel()

    def create(self) -> None:
        conn, channel = self.channel()
        try:
            channel.exchange_declare(self.name, "direct", durable=True, auto_delete=False)
            channel.queue_declare(self.name, durable=True, auto_delete=False)
            channel.queue_bind(self.name, self.name, routing_key="done")
        finally:
            conn.close()
        self.seen: list[Received] = []

    def target(self) -> tuple[str, FleetSettings]:
        return (
            f"amqp://guest:guest@127.0.0.1:{self.port}/?exchange={self.name}&routing_key=done&timeout_s=3",
            FleetSettings(),
        )

    def test_the_default_exchange_is_not_read(self) -> None:
        reader = open_reader(f"amqp://guest:guest@127.0.0.1:{self.port}/?routing_key={self.name}", FleetSettings())
        assert reader is not None
        with pytest.raises(ConfigError, match="default exchange"):
            next(reader.follow(threading.Event(), False, lambda: None))

    def received(self) -> list[Received]:
        conn, channel = self.channel()
        try:
            while (message := channel.basic_get(self.name, no_ack=True)) is not None:
                headers = {k: v for k, v in message.properties["application_headers"].items() if k != "task_id"}
                self.seen.append((message.properties["message_id"], message.body, headers))
        finally:
            conn.close()
        return list(self.seen)

    def test_an_unroutable_record_or_a_missing_exchange_is_parked(self) -> None:
        base = f"amqp://guest:guest@127.0.0.1:{self.port}/"
        for query, reason in ((f"?exchange={self.name}&routing_key=nobody", "unroutable"),
                              ("?exchange=no-such-exchange&routing_key=done", "NotFound")):  # fmt: skip
            dest = open_destination(base + query, FleetSettings())
            try:
                refused = dest.deliver(batch(2))
                assert [r.index for r in refused] == [0, 1] and reason in refused[0].reason, refused
            finally:
                dest.close()
        assert self.keys() == []


def test_a_fleet_posts_its_records_to_a_signed_webhook(harness: FleetHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("E2E_HOOK_SECRET", HOOK_SECRET)  # the fleet's processes inherit it
    _Receiver.got, _Receiver.refused, _Receiver.answer = [], [], 200
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        harness.write_config(defaults={"on_success": f"http://127.0.0.1:{port}/done#secret_env=E2E_HOOK_SECRET"})
        harness.start()
        caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
        harness.produce("requests", [orjson.dumps({"function": "echo", "payload": {"x": 1}, "id": "hooked"})],
                        headers=[("traceparent", caller.encode())])  # fmt: skip
        [(key, body, headers)] = harness.wait_for(lambda: list(_Receiver.got), what="the record at the webhook")
        record = orjson.loads(body)
        # The record continues the message's trace: its trace id, the task's own span.
        task_span = headers.pop("traceparent")
        assert task_span.startswith("00-0af7651916cd43dd8448eb211c80319c-") and "b7ad6b7169203331" not in task_span
        assert key == "requests:hooked" and headers == {"condition": "Success", "function": "echo"}
        done = next(orjson.loads(line) for line in harness.log_text().splitlines() if '"task succeeded"' in line)
        assert done["trace_id"] == "0af7651916cd43dd8448eb211c80319c" and done["span_id"] in task_span
        assert record["requestContext"]["requestId"] == key and record["responsePayload"]["echo"] == {"x": 1}
        assert not _Receiver.refused
    finally:
        harness.stop()
        server.shutdown()
        server.server_close()


# -- URLs and options ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("kafka:///done?acks=0", "take no option 'acks'"),
        ("https://hooks.example.com/done", "secret_env"),  # the secret is required
        ("https://hooks.example.com/done#secret_env=HOOK&timeout=5", "did you mean 'timeout_s'"),
        ("https://hooks.example.com/done#secret_env=HOOK&timeout_s=0", "timeout_s"),
        ("memory:///x?y=1", "take no option 'y'"),
        ("sqs:///results?acount=123456789012", "did you mean 'account'"),
        ("sns:///arn:aws:sns:us-east-1:123456789012:t?raw=1", "take no option 'raw'"),
        ("s3://bucket/prefix?acl=public-read", "take no option 'acl'"),
        ("amqp://rabbit/", "name an exchange"),
        ("amqp://rabbit/?exchange=x&routingkey=y", "did you mean 'routing_key'"),
        ("hookz://x/y", "unsupported destination URL"),
    ],
)
def test_an_option_a_scheme_does_not_take_is_a_config_error(url: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_destination(url, where="triggers/t.yaml", key="on_success", env={"HOOK": HOOK_SECRET})


def test_the_webhook_secret_must_be_set_and_strong_at_load() -> None:
    url = "https://hooks.example.com/done#secret_env=HOOK"
    assert parse_destination(url, env={"HOOK": HOOK_SECRET}).options == {"secret_env": "HOOK"}
    with pytest.raises(ConfigError, match="HOOK is not set"):
        parse_destination(url, env={})
    with pytest.raises(ConfigError, match="HOOK holds a weak secret: it is 5 characters") as err:
        parse_destination(url, env={"HOOK": "short"})
    assert "short" not in str(err.value).replace("5 characters", "")
    assert os.environ.get("HOOK") is None
