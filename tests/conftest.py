"""Fixtures: real Redis and Kafka (tansu) servers, started once per run, and fleets run as real processes."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import FleetHarness

IN_CI = os.environ.get("CI", "").lower() == "true"


@pytest.fixture(scope="session")
def services(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    """Redis and Kafka as local processes. Skips on a laptop that cannot start them; fails under CI=true."""
    from gpufleet.dev.services import LocalServices
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
def harness(services: object, tmp_path: Path) -> Iterator[FleetHarness]:
    """A fleet config isolated by key prefix and topic names; start it with ``harness.start()``."""
    h = FleetHarness(services, tmp_path)
    try:
        yield h
    finally:
        h.stop()
