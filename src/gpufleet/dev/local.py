"""A set of local servers (Redis, Kafka, moto, SeaweedFS) for the demo, the benches and the tests, as one context
manager that stops them in reverse order."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

from gpufleet.dev.objectstores import start_moto, start_seaweedfs
from gpufleet.dev.services import S3Service, Service, ServiceError, start_kafka, start_redis, stop_service


@dataclass
class LocalServices:
    """Context manager that starts local servers in ``workdir`` and stops them in reverse order.

    Redis and Kafka by default; ``moto=True`` adds moto (S3 + SQS + SNS, in memory) and ``seaweedfs=True`` a
    persistent S3 store whose data lives in ``workdir/seaweedfs-data``, so a new LocalServices on the same workdir
    finds the objects again.
    """

    workdir: Path
    kafka: bool = True
    redis: bool = True
    moto: bool = False
    seaweedfs: bool = False
    services: list[Service] = field(default_factory=list, init=False)
    _procs: list[subprocess.Popen[bytes]] = field(default_factory=list, init=False, repr=False)

    def start(self) -> LocalServices:
        """Start the enabled servers; on any failure stop those already started and re-raise."""
        if self.services:  # a second start would run a second set on the same data (e.g. `with svc.start():`)
            raise ServiceError("this LocalServices is already started; stop() it first")
        starters: list[Callable[[Path], tuple[Service, subprocess.Popen[bytes]]]] = [
            starter
            for starter, on in (
                (start_redis, self.redis),
                (start_kafka, self.kafka),
                (start_moto, self.moto),
                (start_seaweedfs, self.seaweedfs),
            )
            if on
        ]
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
        while self.services:
            stop_service(self.services.pop())
        self._procs.clear()

    def service(self, name: str) -> Service:
        """The running server called ``name`` (``redis``, ``kafka``, ``moto`` or ``seaweedfs``)."""
        for service in self.services:
            if service.name == name:
                return service
        raise ServiceError(f"{name} is not running in this LocalServices")

    def _url(self, name: str) -> str:
        return self.service(name).url

    def _s3(self, name: str) -> S3Service:
        service = self.service(name)
        if not isinstance(service, S3Service):
            raise ServiceError(f"{name} is not an S3 service")
        return service

    @property
    def redis_url(self) -> str:
        """Redis URL, e.g. ``redis://127.0.0.1:PORT/0``."""
        return self._url("redis")

    @property
    def kafka_bootstrap(self) -> str:
        """Kafka bootstrap servers string, e.g. ``127.0.0.1:PORT``."""
        return self._url("kafka").removeprefix("kafka://")

    @property
    def moto_url(self) -> str:
        """moto's endpoint for S3, SQS and SNS, e.g. ``http://127.0.0.1:PORT``; any credentials work."""
        return self._url("moto")

    @property
    def seaweedfs_url(self) -> str:
        """SeaweedFS's S3 endpoint, e.g. ``http://127.0.0.1:PORT``."""
        return self._url("seaweedfs")

    @property
    def seaweedfs_access_key(self) -> str:
        """The access key SeaweedFS enforces."""
        return self._s3("seaweedfs").access_key

    @property
    def seaweedfs_secret_key(self) -> str:
        """The secret key SeaweedFS enforces."""
        return self._s3("seaweedfs").secret_key

    def __enter__(self) -> LocalServices:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
