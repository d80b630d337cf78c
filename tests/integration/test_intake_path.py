"""One intake path for every producer, and task messages that are Celery's protocol 2, written without a Celery app
(checked against the installed Celery)."""

from __future__ import annotations

from dataclasses import replace

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.celery_app import create_app
from gpufleet.control.plane import ControlPlane
from gpufleet.errors import RequestError
from gpufleet.intake.path import Intake, Producer
from gpufleet.registry.messages import TASK_NAME, MessageFactory, task_headers
from gpufleet.triggers.ingest import Ingest, SourceMessage
from tests.conftest import IN_CI
from tests.harness import FleetHarness
from tests.strategies import JSON_MESSAGES, dumps


def test_headers_are_what_celery_itself_writes(harness: FleetHarness) -> None:
    """If a Celery upgrade adds or changes a header, this fails before a worker meets the difference."""
    amqp = create_app(harness.fleet()).amqp
    celery = amqp.as_task_v2("0", TASK_NAME, args=(), kwargs={}, time_limit=70.0, soft_time_limit=60.0,
                             origin="gpufleet", ignore_result=True)  # fmt: skip
    ours = task_headers(70.0, 60.0) | {"id": "0", "root_id": "0"}
    assert ours == dict(celery.headers)


def test_an_envelope_carries_the_task_its_limits_and_its_queue(harness: FleetHarness) -> None:
    fleet = harness.fleet()
    fn = fleet.functions["echo"]
    message = MessageFactory(harness.prefix, 5.0).build("api-1", fn, {"n": 1}, {"trigger": "api"})
    envelope = orjson.loads(message.envelope)
    headers = envelope["headers"]
    assert headers["id"] == headers["root_id"] == "api-1"
    assert headers["timelimit"] == [fn.timeout_s + 5.0, fn.timeout_s]
    assert envelope["properties"]["delivery_info"]["routing_key"] == message.queue
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    assert orjson.loads(envelope["body"]) == [[], {"function": "echo", "event": {"n": 1}, "meta": {"trigger": "api"}},
                                              embed]  # fmt: skip


# -- one intake path ----------------------------------------------------------------------------------------------


def test_destinations_come_from_the_trigger_then_the_function_then_the_fleet(harness: FleetHarness) -> None:
    fleet = harness.fleet()
    fn = replace(fleet.functions["echo"], on_success="kafka:///from-function")
    defaults = fleet.settings.defaults

    def routes(producer: Producer) -> tuple[str, str]:
        task = Intake(fleet, producer).task(fn, {}, "t:1", "test")
        return task.on_success, task.on_failure

    trigger = Producer("t", "trigger:t", 100, on_success="kafka:///from-trigger", on_failure="kafka:///t-failed")
    assert routes(trigger) == ("kafka:///from-trigger", "kafka:///t-failed")
    assert routes(Producer("api", "api", 100)) == ("kafka:///from-function", defaults.on_failure)
    assert routes(Producer("api", "api", 100)) != (defaults.on_success, defaults.on_failure)


BAD_EVENTS = {
    b"x" * 5000: "oversize",  # the harness's max_payload_bytes is 4096
    b'{"n": ': "malformed_json",
    b"[" * 70 + b"]" * 70: "nesting_too_deep",
    b'{"n": 123456789012345678901234}': "bad_number",
    b'{"n": "not an int"}': "schema_mismatch",
}
API_CODES = {"oversize": "payload_too_large", "malformed_json": "invalid_json"}


def test_a_trigger_and_invoke_refuse_the_same_events_for_the_same_reasons(harness: FleetHarness) -> None:
    harness.write_config(triggers={"typed": {"source": f"kafka:///{harness.topic('typed')}", "function": "typed"}})
    fleet = harness.fleet()
    ingest, plane = Ingest(fleet, fleet.triggers["typed"]), ControlPlane(fleet)
    try:
        for raw, reason in BAD_EVENTS.items():
            [letter] = ingest.prepare([SourceMessage(raw, "test:1", "1")]).dead
            assert letter.headers["reason"] == reason, raw[:50]
            with pytest.raises(RequestError) as refused:
                plane.invoke("typed", raw)
            assert refused.value.code == API_CODES.get(reason, reason), raw[:50]
        with pytest.raises(RequestError) as refused:  # a decoded event, from a Python caller
            plane.invoke("typed", {"n": "not an int"})
        assert refused.value.code == "schema_mismatch"
        assert plane.invoke("typed", b'{"n": 1}').created
    finally:
        ingest.close()


TYPED_BODIES = st.one_of(JSON_MESSAGES, st.integers().map(lambda n: dumps({"n": n})),
                         st.text(max_size=20).map(lambda t: dumps({"n": t})))  # fmt: skip
FROM_API = {"payload_too_large": "oversize", "invalid_json": "malformed_json"}


@settings(max_examples=400, deadline=None, derandomize=IN_CI, suppress_health_check=[HealthCheck.too_slow,
          HealthCheck.function_scoped_fixture])  # fmt: skip
@given(body=TYPED_BODIES)
def test_whatever_the_bytes_a_trigger_and_invoke_decide_alike(harness: FleetHarness, body: bytes) -> None:
    """Generated bodies, hostile ones included: a task from one is a task from the other, and a refusal has the
    same reason. Only ``bad_id`` is the trigger's alone (invoke takes no id from the body)."""
    harness.write_config(triggers={"typed": {"source": f"kafka:///{harness.topic('typed')}", "function": "typed"}})
    fleet = harness.fleet()
    ingest, plane = Ingest(fleet, fleet.triggers["typed"]), ControlPlane(fleet)
    try:
        prepared = ingest.prepare([SourceMessage(body, "test:1", "1")])
        by_trigger = prepared.dead[0].headers["reason"] if prepared.dead else "task"
        try:
            plane.invoke("typed", body)
            by_api = "task"
        except RequestError as exc:
            by_api = FROM_API.get(exc.code, exc.code)
    finally:
        ingest.close()
    if by_trigger != "bad_id":
        assert by_trigger == by_api, body[:200]
