"""A local RabbitMQ for tests and ``gpufleet dev``: Debian's ``rabbitmq-server`` package, run as a plain process.

RabbitMQ is not on PyPI: ``apt-get install rabbitmq-server`` (``.ci/run`` does it under CI). Each server gets its
own node name, data directory, Erlang cookie (``HOME``), AMQP port and Erlang distribution port, and its own
``epmd`` (Erlang's port mapper) on a free port, run in the foreground as our child: nothing is left behind, and
two servers never share state. Both are stopped by PID. It starts in about 7 s and takes about 130 MB.
"""

from __future__ import annotations

import os
import shutil
import socket
from pathlib import Path

from gpufleet.dev.services import _HOST, Service, ServiceError, _spawn, _wait_ready, free_port, picks_free_port, stop

SERVER = Path("/usr/lib/rabbitmq/bin/rabbitmq-server")
GUEST = "guest"  # RabbitMQ's default user, allowed from loopback only


def rabbitmq_available() -> bool:
    return SERVER.exists() and shutil.which("epmd") is not None


@picks_free_port
def start_rabbitmq(workdir: Path, port: int | None = None, timeout_s: float = 60) -> tuple[Service, list[int]]:
    """Start RabbitMQ on 127.0.0.1 and wait until it accepts an AMQP login.

    Returns:
        The service (``url`` is ``amqp://guest:guest@127.0.0.1:<port>/``) and the PIDs to stop, the server first.

    Raises:
        ServiceError: ``rabbitmq-server`` is not installed, or the server did not start.
    """
    if not rabbitmq_available():
        raise ServiceError("rabbitmq-server not found: install Debian's package (apt-get install rabbitmq-server)")
    workdir = workdir.resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    epmd_port = free_port()
    epmd, _ = _spawn("epmd", ["epmd", "-port", str(epmd_port), "-address", _HOST], workdir)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("RABBITMQ_", "ERL_"))},
        "HOME": str(workdir),  # the Erlang cookie is made here
        "ERL_EPMD_PORT": str(epmd_port),
        "ERL_EPMD_ADDRESS": _HOST,
        "RABBITMQ_NODENAME": f"gpufleet-{port}@localhost",
        "RABBITMQ_NODE_IP_ADDRESS": _HOST,
        "RABBITMQ_NODE_PORT": str(port),
        "RABBITMQ_DIST_PORT": str(free_port()),
        "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
        "RABBITMQ_LOG_BASE": str(workdir / "log"),
        "RABBITMQ_LOGS": "-",  # to stdout: our log file
        "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq"),  # none there: the defaults
        "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
        "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid"),
    }
    (workdir / "enabled_plugins").write_text("[].\n")
    server, log_path = _spawn("rabbitmq", [str(SERVER)], workdir, env=env)

    def check() -> None:
        import amqp

        socket.create_connection((_HOST, port), timeout=1).close()
        conn = amqp.Connection(f"{_HOST}:{port}", userid=GUEST, password=GUEST, connect_timeout=2)
        try:
            conn.connect()
        finally:
            conn.collect()

    try:
        _wait_ready("rabbitmq", server, log_path, check, timeout_s)
    except BaseException:
        stop(epmd)
        raise
    service = Service("rabbitmq", f"amqp://{GUEST}:{GUEST}@{_HOST}:{port}/", server.pid, log_path)
    return service, [server.pid, epmd.pid]


def stop_rabbitmq(pids: list[int]) -> None:
    for pid in pids:
        stop(pid, timeout_s=15)
