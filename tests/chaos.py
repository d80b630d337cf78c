"""A chaos run: events flow through the roles as separate processes while processes are killed and frozen.

Used by ``tests/integration/test_chaos.py`` (a few hundred events, in ``make test``) and ``bench/chaos.py``
(20,000+). The roles are ``gpufleet worker``, ``gpufleet trigger`` and ``gpufleet dispatcher``, each in its own
process group. Meanwhile:

- a Celery pool process (the one running handlers) is SIGKILLed every ``pool_kill_every_s``;
- the trigger and the dispatcher are SIGKILLed and restarted every ``role_kill_every_s``;
- every ``freeze_every_s`` the whole worker tree is frozen (SIGSTOP), killed while frozen, and started again.

Every event is ``{"function": ..., "payload": {"i": n}, "id": ..., "priority": 0-9}``, at priorities spread over
0-9, to the functions of ``KINDS`` in turn: ``chaos``; ``chaos-batch`` (dynamic batching, up to 8 events a call);
``chaos-pair`` (two GPUs at once: the host's GPUs are shared, held in Redis, and reserved); ``chaos-steps`` (five
checkpointed steps: a run after a kill resumes); ``chaos-model-a`` to ``-c`` (a model each, of which a worker keeps
two loaded: tasks are routed to a worker that has theirs, and one is unloaded to load another). Each records every
event's start (pid, time) in Redis. At the end the report counts what was lost, what ran twice and whether a kill
explains it.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
import redis
import yaml

FUNCTIONS = Path(__file__).parent / "functions"
GPU_FUNCTIONS = Path(__file__).parent / "functions_chaos"  # tasks of two GPUs, checkpointing ones, models
KINDS = ("chaos", "chaos-batch", "chaos-model-a", "chaos-pair", "chaos-model-b", "chaos-steps", "chaos-model-c")
ROLES = ("worker", "trigger", "dispatcher")


@dataclass
class Plan:
    events: int = 300
    produce_s: float = 25.0  # events are spread over this long
    task_s: float = 0.1
    pool_kill_every_s: float = 3.0
    role_kill_every_s: float = 10.0
    freeze_every_s: float = 20.0
    freeze_s: float = 3.0
    lease_s: float = 3.0
    settle_timeout_s: float = 180.0
    virtual_gpus: int = 2


@dataclass
class Report:
    sent: int = 0
    succeeded: int = 0
    lost: list[str] = field(default_factory=list)
    duplicate_success: list[str] = field(default_factory=list)  # two different Success records for one task
    redelivered_copies: int = 0  # the same Success record delivered again (at-least-once; consumers de-duplicate)
    run_twice: int = 0
    run_twice_explained: int = 0  # an earlier run's process was killed or frozen
    batched: int = 0  # events that ran in a batch call with others at least once
    detection_s: list[float] = field(default_factory=list)  # a kill -> the interrupted task's next start
    kills: Counter[str] = field(default_factory=Counter)
    exits: Counter[str] = field(default_factory=Counter)  # roles that exited without being killed

    @property
    def trigger_exits(self) -> int:
        return self.exits["trigger"]

    def line(self) -> str:
        det = sorted(self.detection_s)
        median = det[len(det) // 2] if det else 0.0
        return (f"sent {self.sent}, succeeded {self.succeeded}, lost {len(self.lost)}, duplicate Success "
                f"{len(self.duplicate_success)}, redelivered copies {self.redelivered_copies}, run twice "
                f"{self.run_twice} ({self.run_twice_explained} explained by a kill), detection median "
                f"{median:.2f} s max {max(det, default=0.0):.2f} s, {self.batched} ran in a batch with others, kills "
                f"{dict(self.kills)}, exits {dict(self.exits)}")  # fmt: skip


class ChaosFleet:
    """The roles of one fleet, as separate processes on the given Redis and Kafka."""

    def __init__(self, workdir: Path, redis_url: str, bootstrap: str, prefix: str, plan: Plan) -> None:
        self.workdir = workdir
        self.redis_url = redis_url
        self.bootstrap = bootstrap
        self.prefix = prefix
        self.plan = plan
        self.redis = redis.Redis.from_url(redis_url)
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.killed: dict[int, float] = {}  # pid -> when it was killed (or frozen, for a frozen tree)
        self.config = self._write_config()
        self.log = workdir / "chaos.log"

    def topic(self, name: str) -> str:
        return f"{self.prefix}.{name}"

    def _write_config(self) -> Path:
        triggers = self.workdir / "triggers"
        triggers.mkdir(parents=True, exist_ok=True)
        # Its own consumer group: members killed here must not linger in a group another test joins.
        trigger = {"source": f"kafka:///{self.topic('requests')}", "group": f"{self.prefix}-requests"}
        (triggers / "requests.yaml").write_text(yaml.safe_dump(trigger))
        config = {
            "redis": {"url": self.redis_url, "key_prefix": self.prefix},
            "kafka": {"bootstrap_servers": self.bootstrap},
            "worker": {
                "virtual_gpus": self.plan.virtual_gpus,
                "lease_s": self.plan.lease_s,
                "kill_grace_s": 2,
                "shutdown_grace_s": 5,
                "reserve_after_s": 2,  # a 2-GPU task waits that long for its pair, kills or not
                "warm_functions": 2,  # of the models: tasks wait cold_wait_s for a worker that has theirs loaded
                "cold_wait_s": 1,
            },
            "defaults": {
                "on_success": f"kafka:///{self.topic('success')}",
                "on_failure": f"kafka:///{self.topic('failure')}",
                "dead_letter": f"kafka:///{self.topic('dlq')}",
            },
            "dispatcher": {"claim_idle_s": 3},
            "logging": {"level": "warning", "format": "json"},
            "functions": [str(FUNCTIONS), str(GPU_FUNCTIONS)],
            "triggers": [str(triggers)],
        }
        path = self.workdir / "fleet.yaml"
        path.write_text(yaml.safe_dump(config))
        return path

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
        return {**env, "TEST_REDIS_URL": self.redis_url}

    def start(self, role: str) -> None:
        with open(self.log, "ab") as out:
            self.procs[role] = subprocess.Popen([sys.executable, "-m", "gpufleet", role, "--config", str(self.config)],
                                                env=self.env(), stdout=out, stderr=out, process_group=0)  # fmt: skip

    def start_all(self) -> None:
        for role in ROLES:
            self.start(role)

    def tree(self, role: str) -> list[psutil.Process]:
        proc = self.procs.get(role)
        if proc is None or proc.poll() is not None:
            return []
        with contextlib.suppress(psutil.NoSuchProcess):
            root = psutil.Process(proc.pid)
            return [root, *root.children(recursive=True)]
        return []

    def kill_role(self, role: str) -> None:
        """SIGKILL a role's whole process tree (its process group and every descendant), then reap it."""
        proc = self.procs.get(role)
        if proc is None:
            return
        now = time.time()
        for p in self.tree(role):
            self.killed.setdefault(p.pid, now)
            with contextlib.suppress(psutil.NoSuchProcess):
                p.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

    def pool_processes(self) -> list[psutil.Process]:
        """The Celery pool children: the processes that run handlers (grandchildren of the supervisor)."""
        tree = self.tree("worker")
        slots = {p.pid for p in tree[1:] if p.ppid() == tree[0].pid} if tree else set()
        return [p for p in tree[1:] if p.ppid() in slots]

    def stop_all(self) -> None:
        for role in reversed(ROLES):
            proc = self.procs.get(role)
            if proc is not None and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self.kill_role(role)
        for role in ROLES:  # nothing of ours may outlive the run
            self.kill_role(role)


class Chaos:
    def __init__(self, fleet: ChaosFleet, rng: random.Random | None = None) -> None:
        self.fleet = fleet
        self.plan = fleet.plan
        self.rng = rng or random.Random(7)
        self.report = Report()
        self._stop = threading.Event()

    def ids(self) -> list[str]:
        """The task ids: the trigger's name, then the id each event supplies."""
        return [f"requests:{self.fleet.prefix}-c{i}" for i in range(self.plan.events)]

    def run(self, settled: Callable[[], bool] | None = None) -> Report:
        """Run the plan; with ``settled``, the fleet also runs on until it says True (or settle_timeout_s passes)."""
        f = self.fleet
        f.start_all()
        killer = threading.Thread(target=self._killer, name="chaos-killer", daemon=True)
        try:
            killer.start()
            self._produce()
            deadline = time.monotonic() + self.plan.settle_timeout_s
            while time.monotonic() < deadline and self._succeeded() < self.plan.events:
                time.sleep(0.5)
            self._stop.set()
            killer.join()
            # Every role up at the end, so the last records are delivered.
            for role in ROLES:
                if f.procs[role].poll() is not None:
                    f.start(role)
            deadline = time.monotonic() + 60
            while time.monotonic() < deadline and self._succeeded() < self.plan.events:
                time.sleep(0.5)
            deadline = time.monotonic() + self.plan.settle_timeout_s
            while settled is not None and time.monotonic() < deadline and not settled():
                time.sleep(0.5)
            self._verify()
        finally:
            self._stop.set()
            f.stop_all()
        return self.report

    def _produce(self) -> None:
        from kafka import KafkaProducer

        producer = KafkaProducer(bootstrap_servers=self.fleet.bootstrap, acks="all", linger_ms=5)
        try:
            ids = self.ids()
            pause = self.plan.produce_s / max(1, len(ids))
            for i, task_id in enumerate(ids):
                supplied = task_id.partition(":")[2]
                body = {"function": KINDS[i % len(KINDS)], "id": supplied, "priority": i * 7 % 10,
                        "payload": {"i": i, "seconds": self.plan.task_s}}  # fmt: skip
                producer.send(self.fleet.topic("requests"), orjson.dumps(body))
                if pause >= 0.005 or i % 50 == 0:
                    time.sleep(pause if pause >= 0.005 else pause * 50)
            producer.flush()
        finally:
            producer.close()
        self.report.sent = self.plan.events

    def _killer(self) -> None:
        f, plan, start = self.fleet, self.plan, time.monotonic()
        next_pool = start + plan.pool_kill_every_s
        next_role = start + plan.role_kill_every_s / 2
        next_freeze = start + plan.freeze_every_s
        role_turn = 0
        while not self._stop.wait(0.1):
            now = time.monotonic()
            for role in ROLES:  # a role that exited on its own is restarted, and counted
                proc = f.procs.get(role)
                if proc is not None and proc.poll() is not None:
                    self.report.exits[role] += 1
                    f.start(role)
            if now >= next_pool:
                pools = f.pool_processes()
                if pools:
                    victim = self.rng.choice(pools)
                    f.killed.setdefault(victim.pid, time.time())
                    with contextlib.suppress(psutil.NoSuchProcess):
                        victim.kill()
                    self.report.kills["pool process"] += 1
                next_pool = now + plan.pool_kill_every_s
            if now >= next_role:
                role = ("trigger", "dispatcher")[role_turn % 2]
                role_turn += 1
                f.kill_role(role)
                f.start(role)
                self.report.kills[role] += 1
                next_role = now + plan.role_kill_every_s / 2
            if now >= next_freeze:
                tree = f.tree("worker")
                frozen_at = time.time()
                for p in tree:
                    f.killed.setdefault(p.pid, frozen_at)
                    with contextlib.suppress(psutil.NoSuchProcess):
                        p.suspend()
                self._stop.wait(plan.freeze_s)
                f.kill_role("worker")
                f.start("worker")
                self.report.kills["frozen worker tree"] += 1
                next_freeze = time.monotonic() + plan.freeze_every_s

    def _succeeded(self) -> int:
        pipe = self.fleet.redis.pipeline(transaction=False)
        for task_id in self.ids():
            pipe.hget(f"{self.fleet.prefix}:task:{task_id}", "state")
        try:
            return sum(state == b"SUCCEEDED" for state in pipe.execute())
        except (redis.ConnectionError, redis.TimeoutError):  # a test may restart Redis under the fleet
            return 0

    def _verify(self) -> None:
        r, f, report = self.fleet.redis, self.fleet, self.report
        pipe = r.pipeline(transaction=False)
        for task_id in self.ids():
            pipe.hget(f"{f.prefix}:task:{task_id}", "state")
            pipe.lrange(f"chaos:runs:{task_id}", 0, -1)
        replies = pipe.execute()
        for task_id, state, runs in zip(self.ids(), replies[::2], replies[1::2], strict=True):
            if state == b"SUCCEEDED":
                report.succeeded += 1
            else:
                report.lost.append(task_id)
            fields = [run.decode().split() for run in runs]  # pid, time, and for a batch call its size
            starts = [(int(pid), float(ts)) for pid, ts, *_ in fields]
            report.batched += any(int(rest[0]) > 1 for _, _, *rest in fields if rest)
            if len(starts) > 1:
                report.run_twice += 1
                if all(pid in f.killed for pid, _ in starts[:-1]):
                    report.run_twice_explained += 1
                for (pid, _), (_, next_start) in itertools.pairwise(starts):
                    if pid in f.killed:
                        report.detection_s.append(max(0.0, next_start - f.killed[pid]))
        by_key: dict[str, list[bytes]] = defaultdict(list)
        for key, value, _ in topic_records(f.bootstrap, f.topic("success")):
            by_key[key].append(value)
        for key, values in by_key.items():
            outcomes = {orjson.loads(v)["responsePayload"]["attempt"] for v in values}
            if len(outcomes) > 1:
                report.duplicate_success.append(key)
            report.redelivered_copies += len(values) - len(outcomes)


def topic_records(bootstrap: str, topic: str) -> list[tuple[str, bytes, dict[str, str]]]:
    """Every record of a topic as (key, value, headers), from the beginning, once it stops growing."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    out: list[tuple[str, bytes, dict[str, str]]] = []
    try:
        parts = [TopicPartition(topic, p) for p in consumer.partitions_for_topic(topic) or []]
        if not parts:
            return out
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        quiet_until = time.monotonic() + 2.0
        while time.monotonic() < quiet_until:
            batch: Any = consumer.poll(timeout_ms=200)
            for recs in batch.values():
                out += [(r.key.decode() if r.key else "", r.value, {k: v.decode() for k, v in r.headers})
                        for r in recs]  # fmt: skip
                quiet_until = time.monotonic() + 2.0
    finally:
        consumer.close()
    return out
