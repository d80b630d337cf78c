"""The bench's world: sizes, its child processes, its servers and temporary fleet, and the ingest workload's topics.
Shared by the phases (``ingest.py``, ``run.py``)."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import orjson
import psutil
import redis
import yaml

import raw_celery_app
from gpufleet.config import Fleet
from gpufleet.dev.local import LocalServices
from gpufleet.registry.messages import PRIORITY_STEPS, priority_list, queue_name
from gpufleet.registry.store import Registry
from gpufleet.roles import PARENT_ENV

with warnings.catch_warnings():
    warnings.simplefilter("ignore", DeprecationWarning)  # kafka-python 3.x at import time
    from kafka import KafkaProducer
    from kafka.admin import KafkaAdminClient, NewTopic

BENCH_DIR = Path(__file__).resolve().parent
PREFIX = "gpufleet"
# The queues of the noop/stamp/work functions (Gpu(model="any"), pool default), which the bench's GPU worker reads.
GPU_QUEUES = [queue_name(PREFIX, "default", "any", name) for name in ("noop", "stamp", "work", "batchwork")]
T0 = time.monotonic()


@dataclass(frozen=True)
class Sizes:
    ingest: int  # messages per pass of the raw, minimal bridge and gpufleet ingest paths
    small_ingest: int  # messages for the naive bridge (at ~2k msg/s) and for the memory phase's two processes
    latency: int  # timed messages per latency side
    latency_warm: int  # paced messages sent first and not timed
    latency_rate: float  # messages per second
    duty: int  # 20 ms tasks per duty-cycle side
    batch: int  # tasks queued at once per side of the batching throughput figure
    batch_paced: int  # tasks sent one at a time per side of its latency figure
    redis_tasks: int  # empty tasks per side of the Redis CPU figure
    task_ms: float = 20.0


FULL = Sizes(ingest=60_000, small_ingest=20_000, latency=300, latency_warm=20, latency_rate=50.0, duty=300, batch=400,
             batch_paced=60, redis_tasks=4000)  # fmt: skip
QUICK = Sizes(ingest=15_000, small_ingest=5_000, latency=150, latency_warm=10, latency_rate=50.0, duty=100, batch=160,
              batch_paced=30, redis_tasks=1500)  # fmt: skip

# Topics: one fresh topic per ingest path; the memory phase reads two of them again with fresh groups.
TOPICS = {
    "ingest-raw": "bench.ingest.raw",
    "ingest-bridge": "bench.ingest.bridge",
    "ingest-naive": "bench.ingest.naive",
    "ingest-gpufleet": "bench.ingest.gpufleet",
    "memory-gpufleet": "bench.memory.gpufleet",
    "latency-naive": "bench.latency.naive",
    "latency-gpufleet": "bench.latency.gpufleet",
}
# gpufleet triggers of the temporary fleet: name -> (topic, group).
TRIGGERS = {
    "ingest": (TOPICS["ingest-gpufleet"], "bench-ingest-gpufleet"),
    "memory": (TOPICS["memory-gpufleet"], "bench-memory-gpufleet"),
    "latency": (TOPICS["latency-gpufleet"], "bench-latency-gpufleet"),
}


class BenchError(Exception):
    """A phase could not produce its figure (timeout, a process died, a count did not add up)."""


def say(message: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------------------------------
# Child processes: started in their own session, logged to files, stopped by PID (descendants included).


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Children:
    def __init__(self, log_dir: Path, env: dict[str, str]) -> None:
        self.log_dir = log_dir
        self.env = env
        self.running: dict[int, Child] = {}
        self._count = 0

    def start(self, name: str, argv: list[str]) -> Child:
        self._count += 1
        log = self.log_dir / f"{self._count:02d}-{name}.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(argv, env=self.env, cwd=self.log_dir, stdin=subprocess.DEVNULL, stdout=out,
                                    stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        child = Child(name, proc, log)
        self.running[proc.pid] = child
        say(f"started {name} (pid {proc.pid}, log {log.name})")
        return child

    def stop(self, child: Child, timeout_s: float = 20.0) -> None:
        """SIGTERM (a Celery worker shuts down warm), then SIGKILL; then any descendant left over, by PID."""
        try:
            descendants = psutil.Process(child.proc.pid).children(recursive=True)
        except psutil.Error:
            descendants = []
        if child.proc.poll() is None:
            child.proc.send_signal(signal.SIGTERM)
            try:
                child.proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                say(f"{child.name} (pid {child.proc.pid}) ignored SIGTERM for {timeout_s:g} s; killing it")
                child.proc.kill()
                child.proc.wait(timeout=10)
        for proc in descendants:
            with contextlib.suppress(psutil.Error):
                if proc.is_running():  # psutil checks the start time, so a recycled PID is not signalled
                    proc.kill()
                    proc.wait(timeout=5)
        self.running.pop(child.proc.pid, None)

    def stop_all(self) -> None:
        for child in reversed(list(self.running.values())):
            self.stop(child)

    @contextlib.contextmanager
    def session(self, *specs: tuple[str, list[str]]) -> Iterator[list[Child]]:
        """Start the processes, yield them, and stop them (last first) whatever happens."""
        started: list[Child] = []
        try:
            for name, argv in specs:
                started.append(self.start(name, argv))
            yield started
        finally:
            for child in reversed(started):
                self.stop(child)

    def wait_until(self, cond: Callable[[], bool], timeout_s: float, what: str, watch: list[Child] | None = None,
                   interval_s: float = 0.02) -> float:  # fmt: skip
        """Poll ``cond`` until true; raise BenchError on timeout or if a watched process exits. Returns the time."""
        deadline = time.monotonic() + timeout_s
        while True:
            if cond():
                return time.perf_counter()
            for child in watch or []:
                if child.proc.poll() is not None:
                    raise BenchError(f"{what}: {child.name} exited with code {child.proc.returncode}\n"
                                     f"{tail(child.log)}")  # fmt: skip
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {c.name} ---\n{tail(c.log)}" for c in watch or [])
                raise BenchError(f"timed out after {timeout_s:g} s waiting for {what}\n{logs}".rstrip())
            time.sleep(interval_s)


def queued_messages(w: World, function: str) -> int:
    """Messages in a bench function's queue, at every priority level."""
    queue = queue_name(PREFIX, "default", "any", function)
    return sum(int(w.redis.llen(priority_list(queue, p))) for p in PRIORITY_STEPS)


def percentile(values: list[float], q: float) -> float:
    """The ``q`` quantile of ``values``, interpolated between the two nearest."""
    s = sorted(values)
    k = (len(s) - 1) * q
    lo = math.floor(k)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (k - lo)


def redis_lines(client: redis.Redis, key: str) -> list[str]:
    return [v.decode() if isinstance(v, bytes) else str(v) for v in client.lrange(key, 0, -1)]


def tail(path: Path, lines: int = 25) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


# --------------------------------------------------------------------------------------------------------------------
# The benchmark's world: servers, the temporary fleet, clients.


@dataclass
class World:
    sizes: Sizes
    workdir: Path
    services: LocalServices
    config: Path
    fleet: Fleet
    redis: redis.Redis
    registry: Registry
    children: Children
    notes: list[str] = field(default_factory=list)

    @property
    def bootstrap(self) -> str:
        return self.services.kafka_bootstrap

    @property
    def redis_url(self) -> str:
        return self.services.redis_url

    def flush(self) -> None:
        self.redis.flushdb()

    def gpu_worker(self, name: str = "vgpu0") -> tuple[str, list[str]]:
        return f"gpufleet-worker-{name}", [sys.executable, "-m", "gpufleet.worker.process", "--config",
                                           str(self.config), "--name", name, "--gpu", f"{name}:virtual",
                                           "--queues", ",".join(GPU_QUEUES)]  # fmt: skip

    def raw_worker(self) -> tuple[str, list[str]]:
        return "celery-worker", [sys.executable, "-m", "celery", "-A", "raw_celery_app", "worker", "--pool",
                                 "prefork", "--concurrency", "1", "--prefetch-multiplier", "1", "-Q",
                                 raw_celery_app.QUEUE, "-O", "fair", "--without-mingle", "--without-gossip",
                                 "--without-heartbeat", "--loglevel", "INFO", "-n", "raw@%h"]  # fmt: skip

    def trigger_cli(self, name: str) -> tuple[str, list[str]]:
        return f"gpufleet-trigger-{name}", [sys.executable, "-m", "gpufleet", "trigger", "--config", str(self.config),
                                            "--name", name]  # fmt: skip

    def naive_cli(self, topic: str, group: str, mode: str) -> tuple[str, list[str]]:
        return f"naive-bridge-{mode}", [sys.executable, str(BENCH_DIR / "naive_bridge.py"), "--bootstrap",
                                        self.bootstrap, "--redis", self.redis_url, "--topic", topic, "--group",
                                        group, "--mode", mode]  # fmt: skip


def write_fleet(workdir: Path, redis_url: str, bootstrap: str) -> Path:
    """A fleet like config/fleet.yaml, on the bench's servers, with its own functions and triggers folders."""
    functions, triggers, config_dir = workdir / "functions", workdir / "triggers", workdir / "config"
    for folder in (functions, triggers, config_dir):
        folder.mkdir(parents=True, exist_ok=True)
    shutil.copy(BENCH_DIR / "gpufleet_functions.py", functions / "bench_functions.py")
    for name, (topic, group) in TRIGGERS.items():
        trigger = {"source": f"kafka:///{topic}", "group": group, "batch_max": 500}
        (triggers / f"{name}.yaml").write_text(yaml.safe_dump(trigger))
    config = {
        "redis": {"url": redis_url, "key_prefix": PREFIX},
        "kafka": {"bootstrap_servers": bootstrap},
        "worker": {"virtual_gpus": 1, "pools": ["default"], "lease_s": 30},
        "defaults": {
            "on_success": "kafka:///bench.success",
            "on_failure": "kafka:///bench.failure",
            "dead_letter": "kafka:///bench.dead-letter",
        },
        "logging": {"level": "info", "format": "json"},  # as shipped in config/fleet.yaml
        "functions": ["../functions"],
        "triggers": ["../triggers"],
    }
    path = config_dir / "fleet.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def child_env(redis_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    python_path = [str(BENCH_DIR), *filter(None, env.get("PYTHONPATH", "").split(os.pathsep))]
    return env | {
        "PYTHONPATH": os.pathsep.join(python_path),
        "BENCH_REDIS_URL": redis_url,
        "BENCH_PARENT_PID": str(os.getpid()),  # the naive bridge and raw worker stop if the harness dies
        PARENT_ENV: str(os.getpid()),  # gpufleet's roles do the same
        "CUDA_VISIBLE_DEVICES": "",
    }


def ingest_value(i: int) -> bytes:
    """About 200 bytes of JSON naming the ``noop`` function."""
    body = {"function": "noop", "payload": {"seq": i, "user": f"user-{i % 977:04d}", "ts": time.time(),
                                            "text": "lorem ipsum dolor sit amet " * 4}}  # fmt: skip
    return orjson.dumps(body)


def create_topics(bootstrap: str) -> None:
    """Every topic of the run, one partition each (auto-created topics would get the broker's default count)."""
    admin = KafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=10_000)
    try:
        admin.create_topics([NewTopic(t, 1, 1) for t in TOPICS.values()], timeout_ms=10_000)
    finally:
        admin.close()


def produce(bootstrap: str, topics: dict[str, int]) -> bool:
    """``n`` ingest messages to each topic (topic -> n)."""
    producer = KafkaProducer(
        bootstrap_servers=bootstrap, acks=1, enable_idempotence=False, linger_ms=20, batch_size=512 * 1024
    )
    try:
        values = [ingest_value(i) for i in range(max(topics.values()))]
        for topic, n in topics.items():
            for value in values[:n]:
                producer.send(topic, value)
        producer.flush(timeout=120)
    finally:
        producer.close(timeout=10)
    return True
