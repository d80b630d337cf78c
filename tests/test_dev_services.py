"""Real-server tests for gpufleet.dev.services: Redis and Tansu Kafka as local child processes."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
import warnings
from pathlib import Path

import pytest
import redis

from gpufleet.dev.services import LocalServices, ServiceError, dev_down, dev_status, dev_up, start_redis

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


def test_dev_up_status_down_round_trip(tmp_path: Path) -> None:
    assert dev_status(tmp_path) is None
    assert dev_down(tmp_path) is False
    state = dev_up(tmp_path)
    try:
        saved = json.loads((tmp_path / "dev.json").read_text())
        assert saved["redis_url"] == state["redis_url"]
        assert saved["kafka_bootstrap"] == state["kafka_bootstrap"]
        assert set(saved["pids"]) == {"redis", "kafka"}

        status = dev_status(tmp_path)
        assert status is not None
        assert status["alive"] == {"redis": True, "kafka": True}

        # A second `up` reuses the running pair instead of starting new servers.
        assert dev_up(tmp_path)["redis_url"] == state["redis_url"]
        assert json.loads((tmp_path / "dev.json").read_text())["pids"] == saved["pids"]
    finally:
        assert dev_down(tmp_path) is True
    assert not (tmp_path / "dev.json").exists()
    assert dev_status(tmp_path) is None
    assert not any(_pid_alive(pid) for pid in saved["pids"].values())
    assert not _port_open(_redis_hostport(state["redis_url"]))
    assert not _port_open(state["kafka_bootstrap"])


def test_dev_up_servers_outlive_the_launching_process(tmp_path: Path) -> None:
    # `gpufleet dev up` returns while the servers keep running; `dev down` later runs in another process.
    code = "import sys, pathlib; from gpufleet.dev.services import dev_up; dev_up(pathlib.Path(sys.argv[1]))"
    env = os.environ | {
        "PYTHONPATH": os.pathsep.join(filter(None, [str(Path("src").resolve()), os.environ.get("PYTHONPATH")]))
    }
    subprocess.run([sys.executable, "-c", code, str(tmp_path)], check=True, timeout=120, env=env)
    try:
        status = dev_status(tmp_path)
        assert status is not None
        assert status["alive"] == {"redis": True, "kafka": True}
        client = redis.Redis.from_url(str(status["redis_url"]))
        assert client.ping()
        client.close()
    finally:
        assert dev_down(tmp_path) is True
    assert not _port_open(str(status["kafka_bootstrap"]))


def test_start_redis_on_busy_port_raises_with_log(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(ServiceError) as info:
            start_redis(tmp_path, port=port, timeout_s=10)
    message = str(info.value)
    assert "redis" in message
    assert "in use" in message.lower() or "bind" in message.lower()
