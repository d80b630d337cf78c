"""Redis restarted (with AOF persistence) while the fleet runs: every role reconnects by itself, and no task is
lost or succeeds twice."""

from __future__ import annotations

import math
import threading
import time
from pathlib import Path
from typing import Any

from gpufleet.dev.services import start_redis, stop_service
from tests.chaos import Chaos, ChaosFleet, Plan, Report
from tests.harness import FleetHarness


def test_every_role_reconnects_after_a_redis_restart_and_no_task_is_lost(services: Any, harness: FleetHarness,
                                                                         tmp_path: Path) -> None:  # fmt: skip
    workdir = tmp_path / "own-redis"
    service, _ = start_redis(workdir, appendonly=True)
    port = int(service.url.rsplit(":", 1)[1].split("/")[0])
    never = math.inf  # no kills: only Redis goes away
    plan = Plan(events=200, produce_s=20, task_s=0.05, pool_kill_every_s=never, role_kill_every_s=never,
                freeze_every_s=never, settle_timeout_s=150)  # fmt: skip
    fleet = ChaosFleet(harness.dir, service.url, services.kafka_bootstrap, harness.prefix, plan)
    reports: list[Report] = []
    runner = threading.Thread(target=lambda: reports.append(Chaos(fleet).run()))
    runner.start()
    try:
        time.sleep(8)  # events flowing, tasks running
        stop_service(service)  # SIGTERM: Redis writes its AOF out and exits
        time.sleep(4)  # every role meets a dead Redis: triggers, workers, supervisors, the dispatcher
        service, _ = start_redis(workdir, port=port, appendonly=True)
        runner.join(timeout=400)
    finally:
        runner.join(timeout=60)
        stop_service(service)
    [report] = reports
    print(report.line())
    assert report.sent == 200
    assert report.lost == [], report.line()
    assert report.duplicate_success == [], report.line()
    assert report.succeeded == 200
    assert not report.exits, report.line()  # no role gave up: each reconnected by itself
