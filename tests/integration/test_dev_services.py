"""Real-server tests for gpufleet.dev.services: Redis, Tansu Kafka, moto and SeaweedFS as local child processes."""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from contextlib import closing
from pathlib import Path
from typing import Any
from urllib.parse import unquote_plus

import pytest
import redis
from botocore.exceptions import ClientError

from gpufleet.dev import local, objectstores, services
from gpufleet.dev.local import LocalServices
from gpufleet.dev.objectstores import start_seaweedfs
from gpufleet.dev.services import (
    PortTakenError,
    S3Service,
    ServiceError,
    free_port,
    start_kafka,
    start_redis,
    stop,
    stop_service,
)
from gpufleet.dev.stack import dev_down, dev_exports, dev_status
from gpufleet.dev.stack import dev_up as dev_up_with
from tests.s3util import s3_client, sqs_client, start_or_skip

pytestmark = pytest.mark.server  # every backend's own server, started here

with warnings.catch_warnings():
    # kafka-python 3.x uses the deprecated importlib.resources.open_text at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from kafka import KafkaConsumer, KafkaProducer


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _port_open(hostport: str) -> bool:
    host, port = hostport.rsplit(":", 1)
    try:
        socket.create_connection((host, int(port)), timeout=1).close()
    except OSError:
        return False
    return True


def _redis_hostport(url: str) -> str:
    return url.removeprefix("redis://").split("/", 1)[0]


def test_local_services_redis_and_kafka_round_trip(tmp_path: Path) -> None:
    with LocalServices(tmp_path) as services:
        pids = [s.pid for s in services.services]
        assert [s.name for s in services.services] == ["redis", "kafka"]
        assert services.redis_url.startswith("redis://127.0.0.1:")
        assert services.kafka_bootstrap.startswith("127.0.0.1:")

        client = redis.Redis.from_url(services.redis_url)
        assert client.ping()
        client.close()

        topic = f"t-{uuid.uuid4().hex[:8]}"
        producer = KafkaProducer(bootstrap_servers=services.kafka_bootstrap)
        producer.send(topic, b"hello").get(timeout=30)
        producer.close()
        consumer = KafkaConsumer(
            topic,
            bootstrap_servers=services.kafka_bootstrap,
            group_id=f"g-{uuid.uuid4().hex[:8]}",
            auto_offset_reset="earliest",
            session_timeout_ms=6000,
            heartbeat_interval_ms=1000,
        )
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while not values and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=1000).values():
                values.extend(record.value for record in records)
        consumer.close()
        assert values == [b"hello"]

        redis_addr, kafka_addr = _redis_hostport(services.redis_url), services.kafka_bootstrap
        assert (tmp_path / "redis.log").exists()
        assert (tmp_path / "kafka.log").exists()

    assert services.services == []
    assert not any(_pid_alive(pid) for pid in pids)
    assert not _port_open(redis_addr)
    assert not _port_open(kafka_addr)


def dev_up(state_dir: Path) -> dict[str, Any]:
    return dev_up_with(state_dir, rabbitmq=False)  # RabbitMQ's own test starts it; the others need not wait 7 s


def test_dev_up_status_down_round_trip(tmp_path: Path) -> None:
    assert dev_status(tmp_path) is None
    assert dev_down(tmp_path) is False
    state = dev_up(tmp_path)
    try:
        saved = json.loads((tmp_path / "dev.json").read_text())
        assert saved["redis_url"] == state["redis_url"]
        assert saved["kafka_bootstrap"] == state["kafka_bootstrap"]
        assert saved["moto_url"] == state["moto_url"]
        assert set(saved["pids"]) == {"redis", "kafka", "moto"}

        status = dev_status(tmp_path)
        assert status is not None
        assert status["alive"] == {"redis": True, "kafka": True, "moto": True}

        exports = dev_exports(state)
        assert exports["GPUFLEET_S3__ENDPOINT_URL"] == exports["GPUFLEET_S3__SQS_ENDPOINT_URL"] == state["moto_url"]
        assert exports["GPUFLEET_REDIS__URL"] == state["redis_url"]
        with closing(s3_client(exports["GPUFLEET_S3__ENDPOINT_URL"])) as s3:
            assert "Buckets" in s3.list_buckets()

        # A second `up` reuses the running pair instead of starting new servers.
        assert dev_up(tmp_path)["redis_url"] == state["redis_url"]
        assert json.loads((tmp_path / "dev.json").read_text())["pids"] == saved["pids"]
    finally:
        assert dev_down(tmp_path) is True
    assert not (tmp_path / "dev.json").exists()
    assert dev_status(tmp_path) is None
    assert not any(_pid_alive(pid) for pids in saved["pids"].values() for pid in pids)
    assert not _port_open(_redis_hostport(state["redis_url"]))
    assert not _port_open(state["kafka_bootstrap"])
    assert not _port_open(state["moto_url"].removeprefix("http://"))


def test_dev_up_starts_what_an_older_state_file_lacks_and_what_died_on_its_old_port(tmp_path: Path) -> None:
    # dev.json written by an older gpufleet records only redis and kafka, both dead by now.
    port = free_port()
    (tmp_path / "dev.json").write_text(json.dumps({"redis_url": f"redis://127.0.0.1:{port}/0", "pids": {}}))
    state = dev_up(tmp_path)
    try:
        assert state["moto_url"].startswith("http://127.0.0.1:") and state["redis_url"].endswith(f":{port}/0")
        assert state["started"] == ["redis", "kafka", "moto"]
    finally:
        assert dev_down(tmp_path) is True


def kill(pid: int) -> None:
    """SIGKILL, then until it is gone: what a crash leaves."""
    from gpufleet.dev.services import _alive  # reaps our own dead children, as dev up does

    os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)


def test_dev_up_restarts_only_what_is_down_on_its_old_port_with_its_data_and_the_same_token(tmp_path: Path) -> None:
    """Redis killed: `dev up` starts Redis again on its port, with its data, and leaves Kafka and moto running with
    theirs (before, it replaced the whole set: new ports, a new token, lost topics, bucket and queue)."""
    first = dev_up(tmp_path)
    try:
        pids = json.loads((tmp_path / "dev.json").read_text())["pids"]
        client = redis.Redis.from_url(first["redis_url"])
        client.set("kept", "yes")
        time.sleep(1.2)  # Redis writes its append-only file each second
        with closing(s3_client(first["moto_url"])) as s3:
            s3.create_bucket(Bucket="still-there")
        kill(pids["redis"][0])
        again = dev_up(tmp_path)
        assert again["started"] == ["redis"] and again["lost"] == []
        assert {k: again[k] for k in ("redis_url", "kafka_bootstrap", "moto_url", "api_token")} == {
            k: first[k] for k in ("redis_url", "kafka_bootstrap", "moto_url", "api_token")}  # fmt: skip
        now = json.loads((tmp_path / "dev.json").read_text())["pids"]
        assert now["kafka"] == pids["kafka"] and now["moto"] == pids["moto"] and now["redis"] != pids["redis"]
        assert redis.Redis.from_url(again["redis_url"]).get("kept") == b"yes"
        with closing(s3_client(again["moto_url"])) as s3:
            assert [b["Name"] for b in s3.list_buckets()["Buckets"]] == ["still-there"]

        # moto killed: back on its port, empty, and said so; its old port held by someone else: an error, no change.
        kill(now["moto"][0])
        assert dev_up(tmp_path)["lost"] == ["moto"]
        kill(json.loads((tmp_path / "dev.json").read_text())["pids"]["kafka"][0])
        host, port = first["kafka_bootstrap"].split(":")
        with socket.socket() as squatter:
            squatter.bind((host, int(port)))
            squatter.listen()
            with pytest.raises(ServiceError, match=f"kafka is down and its port {port} is held by another process"):
                dev_up(tmp_path)
        assert json.loads((tmp_path / "dev.json").read_text())["api_token"] == first["api_token"]
    finally:
        assert dev_down(tmp_path) is True


def test_dev_up_adds_rabbitmq_where_it_is_installed(tmp_path: Path) -> None:
    import amqp

    from tests.conftest import require_rabbitmq

    require_rabbitmq()
    state = dev_up_with(tmp_path)  # rabbitmq=None: because it is installed
    try:
        assert "rabbitmq" in state["started"] and state["amqp_url"].startswith("amqp://guest:guest@127.0.0.1:")
        conn = amqp.Connection(state["amqp_url"].split("@")[1].rstrip("/"), userid="guest", password="guest")
        conn.connect()
        conn.collect()
        assert dev_status(tmp_path)["alive"]["rabbitmq"] is True  # type: ignore[index]
        assert dev_up_with(tmp_path)["started"] == []
    finally:
        assert dev_down(tmp_path) is True


def test_dev_up_sentinel_runs_redis_as_a_group_that_fails_over(tmp_path: Path) -> None:
    """On request: a master, a replica and three sentinels; the exports name them (sentinel://); the master killed,
    the group fails over, and `up` says which member is down instead of starting a second master."""
    from gpufleet.registry.connection import client

    state = dev_up_with(tmp_path, rabbitmq=False, sentinel=True)
    try:
        url = state["redis_url"]
        assert url.startswith("sentinel://") and dev_exports(state)["GPUFLEET_REDIS__URL"] == url
        assert "sentinel" in state["started"]
        redis_client = client(url, socket_timeout=2)
        redis_client.set("before", 1)
        members = json.loads((tmp_path / "dev.json").read_text())
        master = members["pids"]["sentinel"][members["sentinel_members"].index("master")]
        kill(master)
        again = dev_up_with(tmp_path, rabbitmq=False, sentinel=True)
        assert again["down"] == ["master"] and again["started"] == [] and again["redis_url"] == url

        def failed_over() -> bool:
            try:
                return redis_client.set("after", 1) is True and redis_client.get("before") == b"1"
            except redis.RedisError:
                return False

        deadline = time.monotonic() + 30
        while not failed_over() and time.monotonic() < deadline:
            time.sleep(0.5)
        assert failed_over()
        with pytest.raises(ServiceError, match="this set runs a Sentinel group"):
            dev_up_with(tmp_path, rabbitmq=False)
    finally:
        assert dev_down(tmp_path) is True


def test_dev_up_servers_outlive_the_launching_process(tmp_path: Path) -> None:
    # `gpufleet dev up` returns while the servers keep running; `dev down` later runs in another process.
    code = ("import sys, pathlib; from gpufleet.dev.stack import dev_up; "
            "dev_up(pathlib.Path(sys.argv[1]), rabbitmq=False)")  # fmt: skip
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path("src").resolve()), os.environ.get("PYTHONPATH")]))
    }
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120, env=env)
    try:
        status = dev_status(tmp_path)
        assert status is not None
        assert status["alive"] == {"redis": True, "kafka": True, "moto": True}
        client = redis.Redis.from_url(str(status["redis_url"]))
        assert client.ping()
        client.close()
    finally:
        assert dev_down(tmp_path) is True
    assert not _port_open(str(status["kafka_bootstrap"]))


@pytest.mark.parametrize("start", [start_redis, start_kafka, objectstores.start_moto], ids=["redis", "kafka", "moto"])
def test_a_named_port_held_by_another_program_is_an_error_and_a_picked_one_is_picked_again(
    start: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Under a parallel suite, a free port can be bound by a neighbour between our pick and the server's bind (CI
    # lost a test to moto's "Address already in use" that way). Tansu does not even exit then: it hangs.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(PortTakenError, match="another process holds it"):
            start(tmp_path / "named", port, timeout_s=20)  # a port the caller named is never swapped
        picks = iter([port])
        monkeypatch.setattr(services, "free_port", lambda: next(picks, None) or free_port())
        service, proc = start(tmp_path / "picked")
        try:
            assert next(picks, None) is None  # the held port was picked first, then another
            assert f":{port}" not in service.url
        finally:
            stop(proc)


def _receive(sqs: Any, queue_url: str, count: int, timeout_s: float = 10) -> list[dict[str, Any]]:
    bodies: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout_s
    while len(bodies) < count and time.monotonic() < deadline:
        reply = sqs.receive_message(QueueUrl=queue_url, MaxNumberOfMessages=10, WaitTimeSeconds=1)
        for message in reply.get("Messages", []):
            bodies.append(json.loads(message["Body"]))
            sqs.delete_message(QueueUrl=queue_url, ReceiptHandle=message["ReceiptHandle"])
    return bodies


def test_moto_bucket_notification_sends_s3_event_to_sqs(moto: S3Service) -> None:
    bucket, queue = f"inbox-{uuid.uuid4().hex[:8]}", f"events-{uuid.uuid4().hex[:8]}"
    with closing(s3_client(moto.url)) as s3, closing(sqs_client(moto.url)) as sqs:
        s3.create_bucket(Bucket=bucket)
        queue_url = sqs.create_queue(QueueName=queue)["QueueUrl"]
        arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
        rule = {"Name": "prefix", "Value": "in/"}
        config = {"Id": "gpufleet", "QueueArn": arn, "Events": ["s3:ObjectCreated:*"]}
        config["Filter"] = {"Key": {"FilterRules": [rule]}}
        s3.put_bucket_notification_configuration(
            Bucket=bucket, NotificationConfiguration={"QueueConfigurations": [config]}
        )
        s3.put_object(Bucket=bucket, Key="other/skipped.txt", Body=b"filtered out by the prefix rule")
        s3.put_object(Bucket=bucket, Key="in/a b+c.txt", Body=b"hello", ContentType="text/plain")

        bodies = _receive(sqs, queue_url, count=2)
        assert _receive(sqs, queue_url, count=1, timeout_s=1) == []  # nothing for other/skipped.txt

    # Configuring the notification sends an s3:TestEvent first, as AWS does; it has no Records.
    tests = [b for b in bodies if "Records" not in b]
    assert [(b["Event"], b["Bucket"]) for b in tests] == [("s3:TestEvent", bucket)]
    (event,) = [b for b in bodies if "Records" in b]
    (record,) = event["Records"]
    assert record["eventSource"] == "aws:s3"
    assert record["eventName"] == "ObjectCreated:Put"
    assert record["s3"]["bucket"]["name"] == bucket
    assert unquote_plus(record["s3"]["object"]["key"]) == "in/a b+c.txt"
    assert record["s3"]["object"]["size"] == 5


def test_seaweedfs_enforces_auth_and_paginates_listings(seaweedfs: S3Service) -> None:
    bucket = f"pages-{uuid.uuid4().hex[:8]}"
    keys = [f"in/{i:03d}.txt" for i in range(7)] + ["in/sub/a b+c.txt"]
    with (
        closing(s3_client(seaweedfs.url, seaweedfs.access_key, seaweedfs.secret_key)) as s3,
        closing(s3_client(seaweedfs.url, seaweedfs.access_key, "not-the-secret")) as intruder,
    ):
        with pytest.raises(ClientError) as info:
            intruder.list_buckets()
        assert info.value.response["Error"]["Code"] in {"SignatureDoesNotMatch", "AccessDenied"}

        s3.create_bucket(Bucket=bucket)
        for key in reversed(keys):
            s3.put_object(Bucket=bucket, Key=key, Body=key.encode(), ContentType="text/plain")
        s3.put_object(Bucket=bucket, Key="out/ignored.txt", Body=b"")

        pages: list[list[str]] = []
        kwargs: dict[str, object] = {"Bucket": bucket, "Prefix": "in/", "MaxKeys": 3}
        while True:
            page = s3.list_objects_v2(**kwargs)
            pages.append([item["Key"] for item in page.get("Contents", [])])
            if not page["IsTruncated"]:
                break
            kwargs["ContinuationToken"] = page["NextContinuationToken"]
        assert pages == [keys[0:3], keys[3:6], keys[6:8]]

        after = s3.list_objects_v2(Bucket=bucket, Prefix="in/", StartAfter="in/005.txt")
        assert [item["Key"] for item in after["Contents"]] == keys[6:]
        assert s3.get_object(Bucket=bucket, Key="in/sub/a b+c.txt")["Body"].read() == b"in/sub/a b+c.txt"


def test_local_services_object_stores_stop_by_pid_and_seaweedfs_keeps_data_across_restarts(tmp_path: Path) -> None:
    first = start_or_skip(
        "moto and seaweedfs", LocalServices(tmp_path, kafka=False, redis=False, moto=True, seaweedfs=True).start
    )
    try:
        assert [s.name for s in first.services] == ["moto", "seaweedfs"]
        assert first.moto_url.startswith("http://127.0.0.1:")
        with closing(s3_client(first.moto_url)) as moto_s3:
            moto_s3.create_bucket(Bucket="in-memory")
        with closing(s3_client(first.seaweedfs_url, first.seaweedfs_access_key, first.seaweedfs_secret_key)) as s3:
            s3.create_bucket(Bucket="durable")
            s3.put_object(Bucket="durable", Key="a.txt", Body=b"one")
            s3.put_object(Bucket="durable", Key="dir/b.txt", Body=b"two")
        pids = {s.name: s.pid for s in first.services}
        addresses = [s.url.removeprefix("http://") for s in first.services]
        leftovers = [path for s in first.services for path in s.leftovers]
        assert leftovers and all(path.exists() for path in leftovers)  # weed's unix sockets
    finally:
        first.stop()
    assert first.services == []
    assert not any(_pid_alive(pid) for pid in pids.values())
    assert not any(_port_open(address) for address in addresses)
    assert not any(path.exists() for path in leftovers)

    again = start_or_skip("seaweedfs", LocalServices(tmp_path, kafka=False, redis=False, seaweedfs=True).start)
    try:
        assert again.service("seaweedfs").pid != pids["seaweedfs"]
        with closing(s3_client(again.seaweedfs_url, again.seaweedfs_access_key, again.seaweedfs_secret_key)) as s3:
            listing = s3.list_objects_v2(Bucket="durable")
            assert [item["Key"] for item in listing["Contents"]] == ["a.txt", "dir/b.txt"]
            assert s3.get_object(Bucket="durable", Key="dir/b.txt")["Body"].read() == b"two"
        with pytest.raises(ServiceError, match="not running"):
            again.moto_url  # noqa: B018 - the property raises: moto was not asked for
        with pytest.raises(ServiceError, match="already started"):
            again.start()
    finally:
        again.stop()


def test_local_services_stops_earlier_servers_when_a_later_one_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    started: list[int] = []
    start_moto = objectstores.start_moto

    def recording_start_moto(workdir: Path) -> tuple[S3Service, subprocess.Popen[bytes]]:
        service, proc = start_or_skip("moto", lambda: start_moto(workdir))
        started.append(service.pid)
        return service, proc

    def failing_start_seaweedfs(workdir: Path) -> tuple[S3Service, subprocess.Popen[bytes]]:
        raise ServiceError("seaweedfs (pid 0) failed to start: on purpose")

    monkeypatch.setattr(local, "start_moto", recording_start_moto)
    monkeypatch.setattr(local, "start_seaweedfs", failing_start_seaweedfs)
    services = LocalServices(tmp_path, kafka=False, redis=False, moto=True, seaweedfs=True)
    with pytest.raises(ServiceError, match="on purpose"):
        services.start()
    assert len(started) == 1
    assert not _pid_alive(started[0])
    assert services.services == []


def test_start_seaweedfs_without_weed_raises_service_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(objectstores, "_script", lambda name: None)
    monkeypatch.setattr(objectstores.shutil, "which", lambda name: None)
    with pytest.raises(ServiceError, match="gpufleet\\[local\\]"):
        start_seaweedfs(tmp_path)


def test_eval_of_dev_up_exports_the_fleets_environment_from_any_folder(tmp_path: Path) -> None:
    """`eval "$(gpufleet dev up)"` sets the variables (only the exports are on stdout), and the state lives in one
    place, not in the folder you stand in: `dev down` from another folder stops the same servers."""
    env = os.environ | {"GPUFLEET_DEV_DIR": str(tmp_path / "state"),
                        "PYTHONPATH": str(Path("src").resolve())}  # fmt: skip
    gpufleet = f"{shlex.quote(sys.executable)} -m gpufleet"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    up = subprocess.run(["bash", "-c", f'eval "$({gpufleet} dev up)" && echo "$GPUFLEET_REDIS__URL"'],
                        cwd=tmp_path / "a", env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        assert up.returncode == 0, up.stderr
        redis_url = up.stdout.strip()
        assert redis_url.startswith("redis://127.0.0.1:") and "redis  " in up.stderr
        assert redis.Redis.from_url(redis_url).ping()
        assert not (tmp_path / "a" / ".gpufleet").exists() and (tmp_path / "state" / "dev.json").exists()
    finally:
        down = subprocess.run([*shlex.split(gpufleet), "dev", "down"], cwd=tmp_path / "b", env=env,
                              capture_output=True, text=True, timeout=60)  # fmt: skip
    assert down.stderr.strip() == "stopped", down.stderr


def test_seaweedfs_starts_again_on_other_ports_when_one_of_its_eight_is_taken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SeaweedFS picks eight ports, free when we look; another program binds its S3 port before weed does."""
    picked: list[list[int]] = []
    real = objectstores._free_ports
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        held = holder.getsockname()[1]

        def ports(count: int) -> list[int]:
            got = real(count)
            if not picked:
                got[6] = held  # the S3 port, on the first try only
            picked.append(got)
            return got

        monkeypatch.setattr(objectstores, "_free_ports", ports)
        service, _ = start_seaweedfs(tmp_path)  # weed comes with the dev install: no skip
        try:
            assert len(picked) == 2 and f":{held}" not in service.url
            with closing(s3_client(service.url, service.access_key, service.secret_key)) as s3:
                s3.create_bucket(Bucket="after-a-taken-port")
        finally:
            stop_service(service)
