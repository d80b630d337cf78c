"""Chaos in the suite: a few hundred events through the roles as separate processes while pool processes are
SIGKILLed every few seconds, the trigger and the dispatcher are killed and restarted, and the whole worker tree is
frozen, killed and restarted. One in seven of the events goes to a batch function, one in seven to a function of
two GPUs (the worker GPUs are shared, held and reserved), one in seven to one that checkpoints and resumes, and
three in seven to functions with a model, of which a worker keeps two loaded (routed to, unloaded, loaded again);
priorities are mixed. Nothing is lost, no task has two Success outcomes, and every task succeeds."""

from __future__ import annotations

from typing import Any

import pytest

from tests.chaos import Chaos, ChaosFleet, Plan
from tests.harness import FleetHarness


@pytest.mark.chaos  # leases of 3 s: on a machine loaded by other tests, a starved process loses one it holds
def test_nothing_is_lost_and_nothing_succeeds_twice_under_kills_and_freezes(services: Any, harness: FleetHarness,
                                                                           ) -> None:  # fmt: skip
    plan = Plan(events=300, produce_s=25, pool_kill_every_s=3, role_kill_every_s=10, freeze_every_s=15, freeze_s=3)
    fleet = ChaosFleet(harness.dir, services.redis_url, services.kafka_bootstrap, harness.prefix, plan)
    report = Chaos(fleet).run()
    print(report.line())
    tail = fleet.log.read_text(errors="replace")[-4000:] if fleet.log.exists() else ""
    assert report.sent == 300
    assert report.lost == [], f"{report.line()}\n{tail}"
    assert report.duplicate_success == [], report.line()
    assert report.succeeded == 300
    assert report.run_twice == report.run_twice_explained, report.line()  # only a kill makes a task run again
    assert report.kills["pool process"] >= 5 and report.kills["frozen worker tree"] >= 1, report.line()
    assert report.kills["trigger"] >= 1 and report.kills["dispatcher"] >= 1, report.line()
    assert report.trigger_exits == 0, report.line()  # the trigger died only when we killed it
    assert report.batched > 0, report.line()  # batch calls were among the runs the kills hit
