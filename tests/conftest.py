"""Fixtures: real Redis, Kafka (tansu), moto and SeaweedFS servers, started once per run; fleets as real processes.

The folders say what a test needs: ``unit/`` starts no server (``make check`` runs it alone), ``integration/``
starts servers, processes or whole fleets, and ``contracts/`` runs what every trigger and every destination promises
against each one's real server.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from tests.harness import FleetHarness
from tests.s3util import start_or_skip

if TYPE_CHECKING:
    from gpufleet.dev.fakenvml import FakeGpus
    from gpufleet.dev.services import S3Service

IN_CI = os.environ.get("CI", "").lower() == "true"
UNIT = Path(__file__).parent / "unit"
# A test that uses one of these starts a server or a fleet: it belongs in integration/ or contracts/, not unit/.
SERVER_FIXTURES = frozenset({"services", "harness", "moto", "seaweedfs", "rabbitmq"})
# The longest tests (30 s to 2 min under xdist): started first, so that none of them ends the run alone.
LONGEST = (
    "test_fuzzed_",
    "test_fuzzing_every_operation",
    "test_demo_runs_end_to_end",
    "test_debug_logs_carry_no_secret",
    "test_invoke_wait_cancel_retry_and_gpus",
    "test_control_commands_without_a_running_fleet",
    "test_a_trigger_that_dies_makes_the_process_exit",
    "test_a_rehearsal_runs_every_check_of_the_table",
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Markers from the fixtures a test uses, and the order in which xdist hands tests out.

    - ``server``: the test starts servers or processes (``make check`` runs the others, in seconds).
    - A test of an ``xdist_group`` (the session's RabbitMQ, the fuzzers: on one xdist worker each) gets a longer
      timeout.
    """
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        if names & SERVER_FIXTURES or item.get_closest_marker("serial") or item.get_closest_marker("chaos"):
            item.add_marker(pytest.mark.server)
            if UNIT in item.path.parents:
                raise pytest.UsageError(f"{item.nodeid} starts a server or a fleet: move it to tests/integration")
        if item.get_closest_marker("xdist_group"):
            # CPU-bound (the fuzzers) or slow to start (RabbitMQ): on a loaded machine, more than the usual 180 s.
            item.add_marker(pytest.mark.timeout(600))
    items.sort(key=lambda item: not item.name.startswith(LONGEST))  # stable: the rest keep their order


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Redis and Kafka as local processes. Skips on a laptop that cannot start them; fails under CI=true."""
    from gpufleet.dev.local import LocalServices
    from gpufleet.errors import ServiceError

    svc = LocalServices(tmp_path_factory.mktemp("services"))
    try:
        svc.start()
    except ServiceError as exc:
        if IN_CI:
            pytest.fail(f"local services failed to start under CI:\n{exc}")
        pytest.skip(f"local services unavailable: {exc}")
    yield svc
    svc.stop()


@pytest.fixture
def fake_gpus(tmp_path: Path) -> Iterator[FakeGpus]:
    """GPUs as the fake NVML (``gpufleet.dev.fakenvml``) shows them to this process and to a fleet's processes
    given ``fake_gpus.env``: none until the test adds some."""
    from gpufleet.dev import fakenvml

    gpus = fakenvml.FakeGpus(tmp_path / "nvml.json")
    fakenvml.use(gpus.path)
    yield gpus
    fakenvml.use(None)


@pytest.fixture
def harness(services: object, tmp_path: Path) -> Iterator[FleetHarness]:
    """A fleet config isolated by key prefix and topic names; start it with ``harness.start()``."""
    h = FleetHarness(services, tmp_path)
    h.clear_runs()
    try:
        yield h
    finally:
        h.stop()


@pytest.fixture(scope="session")
def moto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """moto_server: S3, SQS and SNS in memory on one endpoint (``.url``); any credentials, region us-east-1.

    Shared by the whole run: use unique bucket and queue names. Skips on a laptop without it; fails under CI=true.
    """
    from gpufleet.dev.objectstores import start_moto
    from gpufleet.dev.services import stop_service

    service, _ = start_or_skip("moto", lambda: start_moto(tmp_path_factory.mktemp("moto")))
    yield service
    stop_service(service)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Service]:
    """SeaweedFS S3 (``.url``, ``.access_key``, ``.secret_key``, ``.data_dir``), auth enforced, started once per run.

    Shared by the whole run: use unique bucket names. Skips on a laptop without it; fails under CI=true.
    """
    from gpufleet.dev.objectstores import start_seaweedfs
    from gpufleet.dev.services import stop_service

    service, _ = start_or_skip("seaweedfs", lambda: start_seaweedfs(tmp_path_factory.mktemp("seaweedfs")))
    yield service
    stop_service(service)


def require_rabbitmq() -> None:
    """Skip without Debian's rabbitmq-server; under CI=true, fail (``.ci/run`` installs it)."""
    from gpufleet.dev.rabbitmq import rabbitmq_available

    if not rabbitmq_available():
        if IN_CI:
            pytest.fail("rabbitmq-server is not installed (.ci/run installs it: apt-get install rabbitmq-server)")
        pytest.skip("rabbitmq-server is not installed: apt-get install rabbitmq-server")


@pytest.fixture(scope="session")
def rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One RabbitMQ for the run; its ``amqp://guest:guest@127.0.0.1:PORT/`` URL. Tests use queues of their own."""
    from gpufleet.dev.rabbitmq import start_rabbitmq, stop_rabbitmq

    require_rabbitmq()
    service, pids = start_rabbitmq(tmp_path_factory.mktemp("rabbitmq"))
    try:
        yield service.url
    finally:
        stop_rabbitmq(pids)
