"""``gpufleet dev up / down / status``: a laptop's local servers, detached, recorded in ``<state dir>/dev.json``.

``up`` starts what is not running and leaves alone what is:

- a server that runs is kept, with its port and its data;
- one that died is started again on its old port: Redis with its data (it keeps an append-only file in the state
  dir), Kafka (tansu) and moto empty, as they keep theirs in memory; ``up`` says which it restarted, and what that
  lost;
- an old port that another process holds now is an error that says what to do, and nothing else is touched;
- the API token is made once, with the first set, and kept: restarting a server never changes it.

RabbitMQ joins the set where Debian's ``rabbitmq-server`` is installed.
"""

from __future__ import annotations

import json
import secrets
import socket
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from gpufleet.dev.services import (
    _HOST,
    MOTO_ACCESS_KEY,
    MOTO_SECRET_KEY,
    S3_REGION,
    Service,
    ServiceError,
    _alive,
    start_kafka,
    start_redis,
    stop,
)

STATE_FILE = "dev.json"


@dataclass(frozen=True)
class Kind:
    """One server of the set: the state key of its address, and how to start it on a port."""

    url_key: str
    start: Callable[[Path, int | None], tuple[Service, list[int]]]
    keeps_data: bool  # whether a restart finds its data again


def _redis(workdir: Path, port: int | None) -> tuple[Service, list[int]]:
    service, proc = start_redis(workdir, port, appendonly=True)  # its data outlives a crash of the server
    return service, [proc.pid]


def _kafka(workdir: Path, port: int | None) -> tuple[Service, list[int]]:
    service, proc = start_kafka(workdir, port)
    return Service(service.name, service.url.removeprefix("kafka://"), service.pid, service.log_path), [proc.pid]


def _moto(workdir: Path, port: int | None) -> tuple[Service, list[int]]:
    from gpufleet.dev.objectstores import start_moto

    service, proc = start_moto(workdir, port)
    return service, [proc.pid]


def _rabbitmq(workdir: Path, port: int | None) -> tuple[Service, list[int]]:
    from gpufleet.dev.rabbitmq import start_rabbitmq

    return start_rabbitmq(workdir / "rabbitmq", port)


KINDS = {
    "redis": Kind("redis_url", _redis, keeps_data=True),
    "kafka": Kind("kafka_bootstrap", _kafka, keeps_data=False),
    "moto": Kind("moto_url", _moto, keeps_data=False),
    "rabbitmq": Kind("amqp_url", _rabbitmq, keeps_data=False),
}


def dev_up(state_dir: Path, rabbitmq: bool | None = None, sentinel: bool = False) -> dict[str, Any]:
    """Start the servers of the set that are not running; record them in ``state_dir/dev.json``.

    Args:
        rabbitmq: whether RabbitMQ is in the set; None: where Debian's rabbitmq-server is installed.
        sentinel: Redis as a Sentinel group (a master, a replica and three sentinels), to try failover: kill the
            master and watch the fleet follow. A member that is down is reported in ``down``, not restarted (the
            group fails over without it; ``dev down`` then ``dev up --sentinel`` makes a new one).

    Returns:
        The addresses (``redis_url``, ``kafka_bootstrap``, ``moto_url``, ``amqp_url`` with RabbitMQ), ``api_token``,
        ``state_file``, ``started`` (the servers this call started), ``lost`` (those restarted empty, whose data
        was in their memory) and ``down`` (Sentinel group members that are down). :func:`dev_exports` turns it into
        environment variables for the fleet.

    Raises:
        ServiceError: a server could not start, or its old port is taken by another process.
    """
    from gpufleet.dev.rabbitmq import rabbitmq_available

    state_dir.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = _read_state(state_dir) or {}
    names = [n for n in KINDS if n != "rabbitmq" or (rabbitmq_available() if rabbitmq is None else rabbitmq)]
    pids = _pids(state)
    if state and ("sentinel" in pids) != sentinel:
        runs = "a Sentinel group" if "sentinel" in pids else "a plain Redis"
        raise ServiceError(
            f"this set runs {runs}; to switch, `gpufleet dev down` first, then `gpufleet dev up"
            f"{' --sentinel' if sentinel else ''}`"
        )
    started, lost, down = [], [], []
    if sentinel:
        names.remove("redis")
        down = [
            m
            for m, (pid, exe) in zip(state.get("sentinel_members", []), pids.get("sentinel", []), strict=False)
            if not _ours(pid, exe)
        ]
        if "sentinel" not in pids:
            _start_sentinel(state_dir, state)
            started.append("sentinel")
    for name in names:
        if name in pids and all(_ours(pid, exe) for pid, exe in pids[name]):
            continue  # running: kept as it is
        started.append(name)
        if _start(state_dir, state, name, pids):
            lost.append(name)
    # The API's token for this laptop: random, like any token, so a laptop's API is no easier to use for anyone
    # else on the machine or the network than a production one. Made once: the fleet and its clients hold it.
    if not state.get("api_token"):
        state["api_token"] = secrets.token_urlsafe(32)
    _write_state(state_dir, state)
    urls = {KINDS[n].url_key: state[KINDS[n].url_key] for n in names}
    urls["redis_url"] = state["redis_url"]  # a plain one, or the Sentinel group's sentinel:// URL
    return {
        **urls,
        "api_token": state["api_token"],
        "state_file": str(state_dir / STATE_FILE),
        "started": started,
        "lost": lost,
        "down": down,
    }


def _start(state_dir: Path, state: dict[str, Any], name: str, pids: dict[str, list[tuple[int, str | None]]]) -> bool:
    """Start server ``name`` (down, or never started) on its old port, if it had one, and record it in the state
    file at once: a failure later must not orphan it. Returns whether it ran before and lost its data (in memory)."""
    kind = KINDS[name]
    for pid, exe in pids.get(name, []):  # what is left of it (RabbitMQ's epmd)
        if _ours(pid, exe):
            stop(pid)
    old = state.get(kind.url_key)
    port = urlsplit(f"//{old}" if name == "kafka" else str(old)).port if old else None
    if port is not None and not _port_freed(port):
        raise ServiceError(
            f"{name} is down and its port {port} is held by another process; nothing was "
            "changed. Stop that process and run `gpufleet dev up` again, or start a new set on "
            "new ports: `gpufleet dev down`, then `gpufleet dev up` (the fleet needs the new "
            "exports then)"
        )
    service, new_pids = kind.start(state_dir, port)
    state[kind.url_key] = service.url
    state.setdefault("pids", {})[name] = new_pids
    state.setdefault("exes", {})[name] = [_argv0(pid) for pid in new_pids]
    state.setdefault("logs", {})[name] = str(service.log_path)
    _write_state(state_dir, state)
    return old is not None and not kind.keeps_data


def _start_sentinel(state_dir: Path, state: dict[str, Any]) -> None:
    from gpufleet.dev.sentinel import start_sentinel_group

    group = start_sentinel_group(state_dir / "sentinel", secrets.token_urlsafe(24), down_after_ms=2000)
    members = list(group.procs)
    state["redis_url"] = group.url
    state["sentinel_members"] = members
    state.setdefault("pids", {})["sentinel"] = [group.procs[m].pid for m in members]
    state.setdefault("exes", {})["sentinel"] = [_argv0(group.procs[m].pid) for m in members]
    _write_state(state_dir, state)


def dev_exports(state: Mapping[str, object]) -> dict[str, str]:
    """The environment that points a fleet (and the AWS CLI) at the servers of :func:`dev_up`'s result."""
    exports = {
        "GPUFLEET_REDIS__URL": str(state["redis_url"]),
        "GPUFLEET_KAFKA__BOOTSTRAP_SERVERS": str(state["kafka_bootstrap"]),
    }
    if "api_token" in state:
        exports["GPUFLEET_API__TOKEN"] = str(state["api_token"])
    if "moto_url" in state:
        moto_url = str(state["moto_url"])
        exports |= {"GPUFLEET_S3__ENDPOINT_URL": moto_url, "GPUFLEET_S3__SQS_ENDPOINT_URL": moto_url}
        exports |= {"AWS_ACCESS_KEY_ID": MOTO_ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": MOTO_SECRET_KEY}
        exports |= {"AWS_DEFAULT_REGION": S3_REGION}
    return exports


def dev_down(state_dir: Path) -> bool:
    """Stop the servers recorded in ``state_dir/dev.json`` (by PID) and remove it; False if nothing was running."""
    state = _read_state(state_dir)
    if state is None:
        return False
    stopped = False
    for members in reversed(list(_pids(state).values())):
        for pid, exe in members:
            if _ours(pid, exe):
                stop(pid)
                stopped = True
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    return stopped


def dev_status(state_dir: Path) -> dict[str, object] | None:
    """Return the recorded state plus ``{"alive": {name: bool}}``, or None when ``dev up`` has not run."""
    state = _read_state(state_dir)
    if state is None:
        return None
    alive = {name: all(_ours(pid, exe) for pid, exe in members) for name, members in _pids(state).items()}
    return state | {"alive": alive}


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


def _port_freed(port: int, grace_s: float = 3.0) -> bool:
    """Whether the port is free, or frees within ``grace_s`` (a server that has just died is still letting go)."""
    deadline = time.monotonic() + grace_s
    while not _port_free(port):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the servers bind: TIME_WAIT is no owner
        try:
            sock.bind((_HOST, port))
        except OSError:
            return False
    return True


def _read_state(state_dir: Path) -> dict[str, object] | None:
    try:
        state = json.loads((state_dir / STATE_FILE).read_text())
    except (OSError, ValueError):
        return None
    return state if isinstance(state, dict) else None


def _write_state(state_dir: Path, state: Mapping[str, object]) -> None:
    path = state_dir / STATE_FILE
    path.touch(mode=0o600)  # it holds the API token
    path.write_text(json.dumps(state, indent=2))


def _pids(state: Mapping[str, object]) -> dict[str, list[tuple[int, str | None]]]:
    """Each server's processes, with the binary each runs (a state file of older gpufleet: one PID a server)."""
    pids, exes = state.get("pids"), state.get("exes")
    pids = pids if isinstance(pids, dict) else {}
    exes = exes if isinstance(exes, dict) else {}
    found = {}
    for name, value in pids.items():
        listed = value if isinstance(value, list) else [value]
        binaries = exes.get(name)
        binaries = binaries if isinstance(binaries, list) else [binaries] * len(listed)
        found[str(name)] = [(int(pid), exe) for pid, exe in zip(listed, binaries, strict=False)]
    return found
