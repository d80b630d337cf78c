"""A fleet under test: its own config (key prefix, topics) on the shared servers, run as ``gpufleet run``."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import yaml

from gpufleet.config import Fleet, load_fleet
from gpufleet.registry.messages import DEFAULT_PRIORITY, priority_list, queue_name
from gpufleet.registry.store import Registry

FUNCTIONS = Path(__file__).parent / "functions"


def nonzero(counts: dict[str, int]) -> dict[str, int]:
    return {k: v for k, v in counts.items() if v}


class FleetHarness:
    def __init__(self, services: Any, tmp_path: Path) -> None:
        self.services = services
        self.dir = tmp_path
        self.prefix = f"t{uuid.uuid4().hex[:10]}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.hosts: dict[str, subprocess.Popen[bytes]] = {}  # start_host: more worker processes, one per host
        self.redis = redis.Redis.from_url(services.redis_url)
        self.config = self.write_config()

    def clear_runs(self) -> None:
        """The test functions count runs per task id, not per fleet: a test starts them from zero, so ids that an
        earlier test used too (``requests:m0``) are not counted twice."""
        for key in self.redis.scan_iter("runs:*", count=1000):
            self.redis.delete(key)

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def queue(self, function: str, model: str = "any") -> str:
        """The Celery queue of one of the test functions (pool ``default``)."""
        return queue_name(self.prefix, "default", model, function)

    def queue_list(self, function: str, priority: int = DEFAULT_PRIORITY) -> str:
        """The Redis list that holds a test function's messages of one priority."""
        return priority_list(self.queue(function), priority)

    def write_config(self, triggers: dict[str, dict[str, Any]] | None = None, **overrides: Any) -> Path:
        (self.dir / "config").mkdir(exist_ok=True)
        tdir = self.dir / "triggers"
        tdir.mkdir(exist_ok=True)
        triggers = triggers or {"requests": {"source": f"kafka:///{self.topic('requests')}"}}
        for f in tdir.glob("*.yaml"):
            f.unlink()
        for name, body in triggers.items():
            if str(body.get("source", "")).startswith("kafka:"):
                # A consumer group of this fleet's own: the shared broker must never mix two tests' members.
                body = {"group": f"{self.prefix}-{name}", **body}
            (tdir / f"{name}.yaml").write_text(yaml.safe_dump(body))
        config: dict[str, Any] = {
            "redis": {"url": self.services.redis_url, "key_prefix": self.prefix},
            # tansu answers a fetch only once fetch_max_wait_ms has passed, data or not: at the default 50 ms, each
            # idle consumer (and tansu for it) costs 8% of a core, and six fleets at once are the suite's largest
            # idle cost. 200 ms costs a Kafka hop 150 ms more.
            "kafka": {"bootstrap_servers": self.services.kafka_bootstrap, "fetch_max_wait_ms": 200},
            # One GPU worker process each unless a test asks for more: each costs 0.8 s of CPU to start.
            "worker": {"virtual_gpus": 1, "lease_s": 3, "kill_grace_s": 2, "cancel_grace_s": 2},
            "defaults": {
                "on_success": f"kafka:///{self.topic('success')}",
                "on_failure": f"kafka:///{self.topic('failure')}",
                "dead_letter": f"kafka:///{self.topic('dlq')}",
                "max_payload_bytes": 4096,
            },
            "dispatcher": {"claim_idle_s": 5},
            "logging": {"level": "info", "format": "json"},
            "functions": [str(FUNCTIONS)],
            "triggers": [str(tdir)],
        }
        for section, values in overrides.items():
            if isinstance(values, list):  # functions, triggers: the folders themselves
                config[section] = values
            else:
                config.setdefault(section, {}).update(values)
        path = self.dir / "config" / "fleet.yaml"
        path.write_text(yaml.safe_dump(config))
        self.config = path
        return path

    def fleet(self) -> Fleet:
        return load_fleet(self.config, env={})

    @property
    def registry(self) -> Registry:
        return Registry.from_url(self.services.redis_url, self.prefix)

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        return {**env, "TEST_REDIS_URL": self.services.redis_url}

    def start(self, *roles: str) -> None:
        """``gpufleet run`` (all roles), or just the named role processes."""
        log = open(self.dir / "fleet.log", "ab")  # noqa: SIM115 - the child writes to it
        cmd = [sys.executable, "-m", "gpufleet", *(roles or ("run",)), "--config", str(self.config)]
        self.proc = subprocess.Popen(cmd, env=self.env(), stdout=log, stderr=log, process_group=0)
        log.close()

    def start_host(self, hostname: str, pools: list[str], virtual_gpus: int = 1, gpu_model: str | None = None,
                   env: dict[str, str] | None = None, **worker: Any) -> None:  # fmt: skip
        """One more ``gpufleet worker`` process, standing for a host of its own: its name, pools and (virtual) GPUs,
        any other ``worker`` setting, and ``env`` for its functions. Stopped with the harness."""
        env = {**self.env(), **(env or {}), "GPUFLEET_WORKER__HOSTNAME": hostname,
               "GPUFLEET_WORKER__POOLS": f"[{', '.join(pools)}]",
               "GPUFLEET_WORKER__VIRTUAL_GPUS": str(virtual_gpus),
               **{f"GPUFLEET_WORKER__{k.upper()}": str(v) for k, v in worker.items()}}  # fmt: skip
        if gpu_model:
            env["GPUFLEET_WORKER__GPU_MODEL"] = gpu_model
        log = open(self.dir / f"host-{hostname}.log", "ab")  # noqa: SIM115 - the child writes to it
        cmd = [sys.executable, "-m", "gpufleet", "worker", "--config", str(self.config)]
        self.hosts[hostname] = subprocess.Popen(cmd, env=env, stdout=log, stderr=log, process_group=0)
        log.close()

    def stop_host(self, hostname: str, sig: int = signal.SIGTERM, timeout_s: float = 60) -> None:
        """SIGTERM: the host stops as it would (its running tasks get their grace). SIGKILL: the host is gone at once,
        its GPU worker processes (process groups of their own) with it."""
        proc = self.hosts.pop(hostname)
        if proc.poll() is None:
            children: list[psutil.Process] = []
            if sig == signal.SIGKILL:
                with contextlib.suppress(psutil.NoSuchProcess):
                    children = psutil.Process(proc.pid).children(recursive=True)
            os.killpg(proc.pid, sig)  # first, so it cannot start them again
            for child in children:
                with contextlib.suppress(psutil.NoSuchProcess):
                    child.kill()
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()

    def stop(self, timeout_s: float = 60) -> int | None:
        for hostname in list(self.hosts):
            self.stop_host(hostname, timeout_s=timeout_s)
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        code = self.proc.returncode
        self.proc = None
        return code

    def log_text(self) -> str:
        path = self.dir / "fleet.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def produce(self, topic: str, values: list[bytes], headers: list[tuple[str, bytes]] | None = None) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.services.kafka_bootstrap, acks="all")
        try:
            for value in values:
                producer.send(self.topic(topic), value, headers=headers or [])
            producer.flush()
        finally:
            producer.close()

    def send(self, function: str, payload: Any, id: str | None = None, topic: str = "requests") -> None:
        body: dict[str, Any] = {"function": function, "payload": payload}
        if id:
            body["id"] = id
        self.produce(topic, [orjson.dumps(body)])

    def records(self, topic: str, at_least: int, timeout_s: float = 60) -> list[dict[str, Any]]:
        """All records of a topic, read from the beginning, once it holds ``at_least`` (or the timeout passes)."""
        from kafka import KafkaConsumer, TopicPartition

        consumer = KafkaConsumer(bootstrap_servers=self.services.kafka_bootstrap, enable_auto_commit=False)
        deadline = time.monotonic() + timeout_s
        out: list[dict[str, Any]] = []
        try:
            while time.monotonic() < deadline:
                parts = [TopicPartition(self.topic(topic), p)
                         for p in consumer.partitions_for_topic(self.topic(topic)) or []]  # fmt: skip
                if parts:
                    consumer.assign(parts)
                    consumer.seek_to_beginning(*parts)
                    out = []
                    quiet_until = time.monotonic() + 1.0
                    while time.monotonic() < quiet_until:
                        for recs in consumer.poll(timeout_ms=100).values():
                            out += [{"key": r.key.decode() if r.key else None, "raw": r.value,
                                     "headers": {k: v.decode() for k, v in r.headers}} for r in recs]  # fmt: skip
                    if len(out) >= at_least:
                        break
                time.sleep(0.3)
        finally:
            consumer.close()
        for rec in out:
            try:
                rec["value"] = orjson.loads(rec["raw"])
            except orjson.JSONDecodeError:
                rec["value"] = None
        return out

    def wait_api(self, client: Any, timeout_s: float = 60) -> None:
        """Until the API answers ``/healthz`` through ``client`` (an httpx.Client); fails at once if the fleet
        exited."""

        def answers() -> bool:
            import httpx

            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the fleet exited with {self.proc.returncode}:\n{self.log_text()[-4000:]}")
            try:
                return bool(client.get("/healthz").status_code == 200)
            except httpx.TransportError:
                return False

        self.wait_for(answers, timeout_s, what="the API to answer /healthz")

    def wait_for(self, cond: Callable[[], Any], timeout_s: float = 60, what: str = "condition") -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            value = cond()
            if value:
                return value
            time.sleep(0.2)
        raise AssertionError(f"timed out waiting for {what}\n--- fleet log tail ---\n{self.log_text()[-6000:]}")

    def runs(self, task_id: str) -> int:
        return int(self.redis.get(f"runs:{task_id}") or 0)
