"""The HTTP control plane, served by real ``gpufleet api`` / ``gpufleet run`` processes and called over HTTP."""

from __future__ import annotations

import base64
import contextlib
import signal
import socket
import threading
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest
import schemathesis
import structlog.testing
import uvicorn
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import positive_data_acceptance

from gpufleet import trace
from gpufleet.api.app import create_app
from gpufleet.control.plane import ControlPlane
from gpufleet.dev.services import free_port
from tests.harness import FleetHarness

TOKEN = "vlm5BGAxmTo_-cSIGqI7RtGJXLejaQpMe9MJT7Y80F4"
MONITORING = "Mq3Wz8Rk5Tn1Vb7Xc2Lp9Hd4Jf6Gs0Ya"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
MAX_PAYLOAD = 4096  # the harness's defaults.max_payload_bytes
FUZZ_EXAMPLES = 25  # per operation and generation mode: 31 runs, ~700 requests, ~20 s


@dataclass
class Api:
    harness: FleetHarness
    url: str
    client: httpx.Client  # sends the bearer token

    def invoke(self, function: str, event: Any, key: str | None = None) -> str:
        headers = {"Idempotency-Key": key} if key else {}
        r = self.client.post(f"/v1/functions/{function}/invocations", json=event, headers=headers)
        assert r.status_code == 202, r.text
        task_id: str = r.json()["id"]
        return task_id

    def task(self, task_id: str) -> dict[str, Any]:
        r = self.client.get(f"/v1/tasks/{task_id}")
        assert r.status_code == 200, r.text
        view: dict[str, Any] = r.json()
        return view

    def wait_state(self, task_id: str, *states: str, timeout_s: float = 60) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            view = self.task(task_id)
            return view if view["state"] in states else None

        view: dict[str, Any] = self.harness.wait_for(reached, timeout_s, what=f"task {task_id} to be {states}")
        return view


@contextlib.contextmanager
def _serve(services: Any, tmp: Path, *roles: str, **config: Any) -> Iterator[Api]:
    harness = FleetHarness(services, tmp)
    port = free_port()
    harness.write_config(api={"enabled": True, "port": port, "token": TOKEN, **config.pop("api", {})}, **config)
    harness.start(*roles)
    url = f"http://127.0.0.1:{port}"
    try:
        with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
            harness.wait_for(_listening(harness, client), timeout_s=60, what="the API to answer /healthz")
            yield Api(harness, url, client)
    finally:
        harness.stop()


def _listening(harness: FleetHarness, client: httpx.Client) -> Callable[[], bool]:
    def check() -> bool:
        assert harness.proc is not None
        if harness.proc.poll() is not None:
            raise AssertionError(f"the API exited with {harness.proc.returncode}:\n{harness.log_text()[-4000:]}")
        try:
            return client.get("/healthz").status_code in (200, 503)
        except httpx.TransportError:
            return False

    return check


@pytest.fixture(scope="module")
def api(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``gpufleet api`` alone: no workers, so invoked tasks stay QUEUED."""
    with _serve(services, tmp_path_factory.mktemp("api"), "api", api={"monitoring_token": MONITORING}) as api:
        yield api


@pytest.fixture(scope="module")
def fleet(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    """``gpufleet run``: dispatcher, two CPU worker slots, the API and the Kafka trigger."""
    with _serve(services, tmp_path_factory.mktemp("fleet"), worker={"virtual_gpus": 2}) as fleet:
        yield fleet


def error_code(r: httpx.Response, status: int) -> str:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json"
    body = r.json()
    assert set(body) == {"error"} and {"code", "message"} <= set(body["error"]), body
    code: str = body["error"]["code"]
    return code


# -- auth, errors ----------------------------------------------------------------------------------------------


def test_every_route_but_healthz_needs_the_bearer_token(api: Api) -> None:
    with httpx.Client(base_url=api.url, timeout=30) as anonymous:
        r = anonymous.get("/healthz")
        assert r.status_code == 200 and r.json() == {"status": "ok"}
        routes = [("GET", "/v1/tasks/x"), ("POST", "/v1/tasks/x/cancel"), ("POST", "/v1/tasks/x/retry"),
                  ("GET", "/v1/tasks/x/position"), ("GET", "/v1/tasks"), ("GET", "/v1/functions"),
                  ("GET", "/v1/functions/echo/queue"), ("GET", "/v1/gpus"), ("POST", "/v1/functions/echo/invocations"),
                  ("GET", "/openapi.json"), ("GET", "/metrics"), ("GET", "/v1/scaling"),
                  ("GET", "/v1/scaling/default/any"), ("GET", "/v1/overview"), ("GET", "/v1/usage"),
                  ("GET", "/v1/functions/echo/versions"), ("GET", "/v1/functions/echo/aliases"),
                  ("PUT", "/v1/functions/echo/aliases/prod")]  # fmt: skip
        for auth in (None, "Bearer wrong-token-0123456789", f"Basic {TOKEN}", "Bearer", f"Bearer {TOKEN}x"):
            headers = {"Authorization": auth} if auth else {}
            for method, path in routes:
                r = anonymous.request(method, path, headers=headers, content=b"{}")
                assert error_code(r, 401) == "unauthorized", (auth, method, path)
                assert r.headers["www-authenticate"] == "Bearer"
        # Checked before the query is: no token, no hint about what else is wrong.
        assert error_code(anonymous.get("/v1/tasks?limit=0"), 401) == "unauthorized"
        # A header that is not ASCII is a wrong token, not a crash.
        r = anonymous.get("/v1/functions", headers=[(b"Authorization", b"Bearer \xff\xfe")])
        assert error_code(r, 401) == "unauthorized"
    r = api.client.get("/v1/functions")
    assert r.status_code == 200
    assert api.client.get("/v1/functions", headers={"Authorization": f"bearer {TOKEN}"}).status_code == 200


def test_unknown_tasks_functions_and_routes_are_404(api: Api) -> None:
    c = api.client
    for method, path in [("GET", "/v1/tasks/nope"), ("POST", "/v1/tasks/nope/cancel"),
                         ("POST", "/v1/tasks/nope/retry"), ("GET", "/v1/tasks/nope/position")]:  # fmt: skip
        assert error_code(c.request(method, path), 404) == "task_not_found", path
    assert error_code(c.post("/v1/functions/nope/invocations", json={}), 404) == "function_not_found"
    assert error_code(c.post("/v1/functions/nope/invocations", content=b"not json"), 404) == "function_not_found"
    assert error_code(c.get("/v1/functions/nope/queue"), 404) == "function_not_found"
    assert error_code(c.get("/v1/tasks", params={"function": "nope"}), 404) == "function_not_found"
    for path in ("/v1/nope", "/nope", "/v1/tasks/", "/v1/tasks/a/b/c", "/docs"):
        assert error_code(c.get(path), 404) == "not_found", path
    r = c.delete("/v1/tasks/x")
    assert error_code(r, 405) == "method_not_allowed"
    assert r.headers["allow"] == "GET"


def test_bad_input_is_422_with_a_stable_code(api: Api) -> None:
    c = api.client
    for body in (b"{not json", b"", b"[1,", b"NaN", b"\xff", b'{"a": 1e999999}', b'"\\ud800"'):
        r = c.post("/v1/functions/echo/invocations", content=body, headers={"content-type": "application/json"})
        assert error_code(r, 422) == "invalid_json", body
    r = c.post("/v1/functions/typed/invocations", json={"n": "three"})
    assert error_code(r, 422) == "schema_mismatch"
    assert "Typed" in r.json()["error"]["message"]
    assert "n: Input should be a valid integer" in r.json()["error"]["message"]
    assert "pydantic.dev" not in r.json()["error"]["message"]  # no "For further information visit ..."
    assert error_code(c.post("/v1/functions/typed/invocations", json=[1]), 422) == "schema_mismatch"
    for state in ("BOGUS", "Succeeded"):  # upper or lower case, as the CLI takes them; not anything
        assert error_code(c.get("/v1/tasks", params={"state": state}), 422) == "bad_state"
    assert c.get("/v1/tasks", params={"state": "succeeded"}).status_code == 200
    for params in ({"limit": 0}, {"limit": 501}, {"limit": "ten"}):
        r = c.get("/v1/tasks", params=params)
        assert error_code(r, 422) == "invalid_request", params
        [detail] = r.json()["error"]["details"]
        assert detail["loc"] == ["query", next(iter(params))]
    # An unknown query parameter is an error, not silently ignored: a typo must not list every task.
    for path in ("/v1/tasks?fucntion=echo", "/v1/functions?x=1", "/v1/tasks/x?verbose=1"):
        r = c.get(path)
        assert error_code(r, 422) == "invalid_request", path
        assert r.json()["error"]["details"][0]["type"] == "extra_forbidden"
    for cursor in ("garbage!", "AAAA", base64.urlsafe_b64encode(b"x12").decode()):
        assert error_code(c.get("/v1/tasks", params={"cursor": cursor}), 422) == "bad_cursor", cursor
    for key in (b"k" * 256, b"tab\there", "clé".encode("latin-1")):
        r = c.post("/v1/functions/echo/invocations", json={}, headers={"Idempotency-Key": key})
        assert error_code(r, 422) == "invalid_request", key


def test_bodies_over_max_payload_bytes_are_413(api: Api) -> None:
    big = b'"' + b"x" * MAX_PAYLOAD + b'"'
    r = api.client.post("/v1/functions/echo/invocations", content=big)
    assert error_code(r, 413) == "payload_too_large"
    # Chunked: no Content-Length to go by, so the limit applies while reading.
    r = api.client.post("/v1/functions/echo/invocations", content=iter([big[:2000], big[2000:]]))
    assert "content-length" not in r.request.headers
    assert error_code(r, 413) == "payload_too_large"
    # Just under the limit (whitespace included) is fine.
    fits = b'"' + b"x" * (MAX_PAYLOAD - 2) + b'"'
    assert api.client.post("/v1/functions/echo/invocations", content=fits).status_code == 202


def test_invoke_takes_a_priority_and_refuses_one_out_of_range(api: Api) -> None:
    low = api.client.post("/v1/functions/echo/invocations?priority=1", json={"p": 1}).json()["id"]
    high = api.client.post("/v1/functions/echo/invocations?priority=8", json={"p": 8}).json()["id"]
    assert api.client.get(f"/v1/tasks/{high}").json()["priority"] == 8
    assert api.client.get(f"/v1/tasks/{high}/position").json()["position"] < \
        api.client.get(f"/v1/tasks/{low}/position").json()["position"]  # fmt: skip
    r = api.client.post("/v1/functions/echo/invocations?priority=12", json={})
    assert error_code(r, 422) == "invalid_request" and "priority" in r.json()["error"]["message"]


# -- tasks without workers --------------------------------------------------------------------------------------


def test_a_queued_task_has_a_position_and_cancels_at_once_then_retries(api: Api) -> None:
    r = api.client.post("/v1/functions/echo/invocations", json={"q": 1})
    assert r.status_code == 202
    task_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/tasks/{task_id}"
    position = api.client.get(f"/v1/tasks/{task_id}/position").json()
    assert position["state"] == "QUEUED" and position["position"] >= 1
    assert position["ahead"] == position["position"] - 1 and position["queue_length"] >= position["position"]
    r = api.client.post(f"/v1/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["outcome"] == "cancelled" and r.json()["state"] == "CANCELLED"
    view = api.task(task_id)
    assert view["state"] == "CANCELLED" and view["condition"] == "Cancelled" and view["finished_at"]
    assert api.client.get(f"/v1/tasks/{task_id}/position").json()["position"] is None
    r = api.client.post(f"/v1/tasks/{task_id}/retry")
    assert r.status_code == 202, r.text
    assert r.json() == {"id": task_id, "outcome": "queued", "previous_state": "CANCELLED", "state": "QUEUED"}
    assert r.headers["location"] == f"/v1/tasks/{task_id}"
    assert api.task(task_id)["state"] == "QUEUED"
    assert error_code(api.client.post(f"/v1/tasks/{task_id}/retry"), 409) == "not_retriable"


def test_tasks_are_listed_newest_first_with_filters_and_cursor_pages(api: Api) -> None:
    slow = [api.invoke("slow", {"seconds": i}) for i in range(4)]
    typed = [api.invoke("typed", {"n": i}) for i in range(3)]
    ours = slow + typed

    def pages(**params: Any) -> list[list[dict[str, Any]]]:
        out, cursor = [], None
        while True:
            r = api.client.get("/v1/tasks", params={**params, **({"cursor": cursor} if cursor else {})})
            assert r.status_code == 200, r.text
            out.append(r.json()["items"])
            cursor = r.json()["next_cursor"]
            if cursor is None:
                return out

    every = pages(limit=3)
    assert all(len(page) == 3 for page in every[:-1]) and 1 <= len(every[-1]) <= 3
    ids = [t["id"] for page in every for t in page]
    assert len(ids) == len(set(ids)) and set(ours) <= set(ids)
    assert [i for i in ids if i in ours] == ours[::-1]  # newest first
    assert [[t["id"] for t in page] for page in pages(function="slow", limit=3)] == [slow[:0:-1], slow[:1]]
    assert [t["id"] for t in pages(function="typed")[0]] == typed[::-1]
    assert [t["id"] for t in pages(function="typed", state="QUEUED")[0]] == typed[::-1]
    assert pages(function="typed", state="SUCCEEDED") == [[]]
    assert api.client.post(f"/v1/tasks/{slow[0]}/cancel").json()["outcome"] == "cancelled"
    assert [t["id"] for t in pages(function="slow", state="CANCELLED")[0]] == [slow[0]]
    assert [t["id"] for t in pages(function="slow", state="QUEUED")[0]] == slow[:0:-1]
    item = pages(function="slow", state="CANCELLED")[0][0]
    assert item["function"] == "slow" and item["state"] == "CANCELLED" and item["source"] == "api"


def test_queue_counts_tasks_per_state(api: Api) -> None:
    first, _ = api.invoke("always_fail", {}), api.invoke("always_fail", {})
    api.client.post(f"/v1/tasks/{first}/cancel")
    r = api.client.get("/v1/functions/always_fail/queue")
    assert r.status_code == 200, r.text
    queue = r.json()
    assert queue["function"] == "always_fail" and queue["length"] == 1
    assert {k: v for k, v in queue["counts"].items() if v} == {"QUEUED": 1, "CANCELLED": 1}
    assert set(queue["counts"]) == {"QUEUED", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "EXPIRED"}
    assert queue["summary"] == {"queued": 1, "running": 0, "completed": 0, "failed": 0, "cancelled": 1}


def test_functions_lists_the_served_functions(api: Api) -> None:
    r = api.client.get("/v1/functions")
    assert r.status_code == 200
    functions = {f["name"]: f for f in r.json()["items"]}
    assert {"echo", "always_fail", "slow", "typed", "hang"} <= set(functions)
    assert functions["typed"]["payload_schema"]["properties"] == {"n": {"title": "N", "type": "integer"}}
    assert functions["echo"]["payload_schema"] is None
    assert functions["echo"]["max_attempts"] == 3 and functions["hang"]["timeout_s"] == 1
    assert functions["echo"]["gpu"] == {"model": "any", "count": 1, "pools": ["default"], "memory_gb": None}
    assert functions["sized"]["gpu"]["memory_gb"] == 40
    assert functions["batched"]["version"] == "7" and functions["echo"]["version"] == "$LATEST"
    r = api.client.get("/v1/functions/batched/versions")
    assert r.status_code == 200 and [v["version"] for v in r.json()["items"]] == ["7"]
    assert r.json()["items"][0]["state"] in ("INACTIVE", "DEPLOYING", "ACTIVE")
    assert error_code(api.client.get("/v1/functions/nope/versions"), 404) == "function_not_found"
    r = api.client.put("/v1/functions/batched/aliases/canary", json={"weights": {"7": 0.8, "8": 0.2}})
    assert r.status_code == 200 and r.json() == {"aliases": {"canary": {"7": 0.8, "8": 0.2}}}
    assert api.client.get("/v1/functions/batched/aliases").json() == {"aliases": {"canary": {"7": 0.8, "8": 0.2}}}
    bad = api.client.put("/v1/functions/batched/aliases/canary", json={"weights": {}})
    assert error_code(bad, 422) == "invalid_request"  # the body's schema says it: at least one version


def test_openapi_spec_documents_every_route_and_the_bearer_scheme(api: Api) -> None:
    r = api.client.get("/openapi.json")
    assert r.status_code == 200
    spec = r.json()
    assert spec["openapi"].startswith("3.")
    assert spec["components"]["securitySchemes"] == {
        "bearer": {"type": "http", "scheme": "bearer", "description": "the fleet's api.token"}
    }
    operations = {(m.upper(), p): op for p, item in spec["paths"].items() for m, op in item.items()}
    assert set(operations) == {
        ("POST", "/v1/functions/{name}/invocations"), ("GET", "/v1/tasks/{task_id}"),
        ("POST", "/v1/tasks/{task_id}/cancel"), ("POST", "/v1/tasks/{task_id}/retry"),
        ("GET", "/v1/tasks/{task_id}/position"), ("GET", "/v1/tasks"), ("GET", "/v1/functions"),
        ("GET", "/v1/functions/{name}/queue"), ("GET", "/v1/functions/{name}/versions"), ("GET", "/v1/gpus"),
        ("GET", "/v1/functions/{name}/aliases"), ("PUT", "/v1/functions/{name}/aliases/{alias}"),
        ("GET", "/healthz"),
        ("GET", "/v1/parked"), ("POST", "/v1/parked/resend"), ("POST", "/v1/parked/drop"),
        ("GET", "/v1/scaling"), ("GET", "/v1/scaling/{pool}/{model}"), ("GET", "/metrics"), ("GET", "/v1/overview"),
        ("GET", "/v1/usage"), ("POST", "/v1/gpus/{worker}/cordon"), ("POST", "/v1/gpus/{worker}/uncordon"),
    }  # fmt: skip
    for (_, path), op in operations.items():
        assert op.get("security") == (None if path == "/healthz" else [{"bearer": []}]), path
        for status, response in op["responses"].items():
            if status >= "400":
                assert response["content"]["application/json"]["schema"] == {
                    "$ref": "#/components/schemas/ErrorResponse"
                }, (path, status)
    invoke = operations["POST", "/v1/functions/{name}/invocations"]
    assert invoke["requestBody"]["content"] == {"application/json": {"schema": {}}}
    assert {"202", "401", "404", "413", "422", "503"} <= set(invoke["responses"])
    assert "HTTPValidationError" not in spec["components"]["schemas"]  # FastAPI's shape is not ours
    # schemathesis loads it only if it is a valid OpenAPI document
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", headers=AUTH)
    assert len(list(schema.get_all_operations())) == len(operations)


# -- tasks run by workers --------------------------------------------------------------------------------------


def test_invoke_runs_the_function_and_the_task_shows_its_result(fleet: Api) -> None:
    r = fleet.client.post("/v1/functions/echo/invocations", json={"x": 1})
    assert r.status_code == 202 and r.json()["created"] is True
    task_id = r.json()["id"]
    assert r.headers["location"] == f"/v1/tasks/{task_id}"
    view = fleet.wait_state(task_id, "SUCCEEDED")
    assert fleet.client.get(r.headers["location"]).json() == view
    assert view["id"] == task_id and view["function"] == "echo" and view["source"] == "api"
    assert view["result"] == {"echo": {"x": 1}, "attempt": 1} and view["error"] is None
    assert view["attempts"] == 1 and view["condition"] == "Success"
    assert view["progress"] == {"fraction": 1.0, "message": "echoed"}
    assert view["worker"].startswith("vgpu") and view["gpu"].startswith("vgpu")
    assert view["created_at"] <= view["started_at"] <= view["finished_at"]
    assert fleet.harness.runs(task_id) == 1
    position = fleet.client.get(f"/v1/tasks/{task_id}/position").json()
    assert position["state"] == "SUCCEEDED" and position["position"] is None
    # A finished task: cancel changes nothing (200), and it cannot be retried (409).
    r = fleet.client.post(f"/v1/tasks/{task_id}/cancel")
    assert r.status_code == 200 and r.json()["outcome"] == "noop" and r.json()["state"] == "SUCCEEDED"
    assert error_code(fleet.client.post(f"/v1/tasks/{task_id}/retry"), 409) == "not_retriable"
    assert fleet.task(task_id)["state"] == "SUCCEEDED"
    queue = fleet.client.get("/v1/functions/echo/queue").json()
    assert queue["counts"]["SUCCEEDED"] >= 1 and queue["summary"]["completed"] == queue["counts"]["SUCCEEDED"]


def test_the_same_idempotency_key_names_the_same_task_which_runs_once(fleet: Api) -> None:
    key = "order-42/resize"
    bodies = [b'{"n": 0, "size": [1, 2]}', b'{"size":[1,2],"n":0}']  # one event, written two ways
    responses = [fleet.client.post("/v1/functions/echo/invocations", content=body,
                                   headers={"Idempotency-Key": key, "content-type": "application/json"})
                 for body in bodies]  # fmt: skip
    assert [r.status_code for r in responses] == [202, 202]
    assert [r.json()["created"] for r in responses] == [True, False]
    task_id = responses[0].json()["id"]
    assert responses[1].json()["id"] == task_id and responses[1].headers["location"] == f"/v1/tasks/{task_id}"
    assert fleet.wait_state(task_id, "SUCCEEDED")["result"]["echo"] == {"n": 0, "size": [1, 2]}
    # The key again with another event: a mistake, said so, not the old task passed off as this one's.
    reused = fleet.client.post("/v1/functions/echo/invocations", json={"n": 2}, headers={"Idempotency-Key": key})
    assert error_code(reused, 409) == "idempotency_key_reused"
    assert fleet.harness.runs(task_id) == 1
    # Keys are per function.
    assert fleet.invoke("typed", {"n": 2}, key=key) != task_id


def test_a_failed_task_retried_runs_again(fleet: Api) -> None:
    task_id = fleet.invoke("always_fail", {"x": 1})
    view = fleet.wait_state(task_id, "FAILED")
    assert view["attempts"] == 3 and view["condition"] == "RetriesExhausted"
    assert view["error"]["errorType"] == "ValueError" and view["error"]["errorMessage"] == "boom on attempt 3"
    assert view["error"]["stackTrace"]
    assert fleet.harness.runs(task_id) == 3
    # A listing keeps it short: the error without its stack trace (one task's GET has it).
    listed = fleet.client.get("/v1/tasks", params={"function": "always_fail"}).json()["items"]
    [row] = [t for t in listed if t["id"] == task_id]
    assert row["error"] == {k: v for k, v in view["error"].items() if k != "stackTrace"} and row["result"] is None
    r = fleet.client.post(f"/v1/tasks/{task_id}/retry")
    assert r.status_code == 202, r.text
    assert r.json()["previous_state"] == "FAILED"
    fleet.harness.wait_for(lambda: fleet.harness.runs(task_id) == 6, what="the retried task to run three more times")
    assert fleet.wait_state(task_id, "FAILED")["attempts"] == 3


def test_gpus_lists_the_worker_slots(fleet: Api) -> None:
    def slots() -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = fleet.client.get("/v1/gpus").json()["items"]
        return items if len(items) == 2 else []

    gpus = fleet.harness.wait_for(slots, what="the supervisor to publish its GPU inventory")
    assert all(g["virtual"] and g["up"] and not g["stale"] for g in gpus)
    assert sorted(g["worker"].split("@")[0] for g in gpus) == ["vgpu0", "vgpu1"]

    def idle_pool() -> dict[str, Any] | None:
        # The fleet is the module's: a task another test left running may still hold a GPU for a moment.
        (pool,) = fleet.client.get("/v1/gpus").json()["pools"]
        return pool if pool["busy"] == 0 else None

    group = fleet.harness.wait_for(idle_pool, what="the fleet's GPUs to be idle")
    host = gpus[0]["host"]
    assert group == {
        "pool": "default",
        "model": "virtual",
        "gpus": 2,
        "busy": 0,
        "idle": 2,
        "stale": 0,
        "hosts": [host],
    }


# -- the server -------------------------------------------------------------------------------------------------


def test_a_monitoring_token_reads_metrics_and_scaling_and_nothing_else(api: Api) -> None:
    """What Prometheus and KEDA hold cannot invoke, cancel, or read a task (before: only the full token worked)."""
    monitor = httpx.Client(base_url=api.url, headers={"Authorization": f"Bearer {MONITORING}"})
    for path in ("/metrics", "/v1/scaling", "/v1/scaling/default/any", "/v1/usage?since=2h&by=model"):
        assert monitor.get(path).status_code == 200, path
        assert api.client.get(path).status_code == 200, path  # the full token still reads them
    task = api.invoke("echo", {"x": 1})
    for method, path in (("POST", "/v1/functions/echo/invocations"), ("GET", f"/v1/tasks/{task}"),
                         ("POST", f"/v1/tasks/{task}/cancel"), ("GET", "/v1/tasks"), ("GET", "/v1/functions"),
                         ("GET", "/v1/overview"), ("GET", "/v1/parked"), ("GET", "/openapi.json")):  # fmt: skip
        assert monitor.request(method, path, json={}).status_code == 401, (method, path)
    assert api.task(task)["state"] == "QUEUED"


def test_answers_are_never_cached_nor_sniffed(fleet: Api) -> None:
    """Task results and errors must not stay in a browser's or a proxy's cache."""
    anonymous = httpx.Client(base_url=fleet.url)
    for r in (fleet.client.get("/v1/functions"), fleet.client.get("/v1/tasks/nope"), anonymous.get("/v1/functions"),
              fleet.client.get("/healthz"), fleet.client.get("/metrics")):  # fmt: skip
        assert r.headers["cache-control"] == "no-store", (r.request.url, r.headers)
        assert r.headers["x-content-type-options"] == "nosniff", (r.request.url, r.headers)
    static = anonymous.get("/dashboard/static/dashboard.js")
    assert static.status_code == 200 and static.headers["x-content-type-options"] == "nosniff"


def test_redis_unreachable_is_503(services: Any, tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
        with _serve(services, tmp_path, "api", redis={"url": dead}) as api:
            assert error_code(api.client.get("/healthz"), 503) == "unavailable"
            assert error_code(api.client.get("/v1/tasks/x"), 503) == "unavailable"
            assert error_code(api.client.post("/v1/functions/echo/invocations", json={}), 503) == "unavailable"
            assert error_code(api.client.get("/v1/tasks"), 503) == "unavailable"
            # Answered without Redis: the route's own checks come first.
            assert error_code(api.client.get("/v1/functions/nope/queue"), 404) == "function_not_found"
            assert api.client.get("/v1/functions").status_code == 200
            assert {f["state"] for f in api.client.get("/v1/functions").json()["items"]} == {None}  # not known now


def test_sigterm_stops_the_api_cleanly(harness: FleetHarness) -> None:
    port = free_port()
    harness.write_config(api={"enabled": True, "port": port, "token": TOKEN})
    harness.start("api")
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
        harness.wait_for(_listening(harness, client), what="the API to answer /healthz")
    assert harness.proc is not None
    harness.proc.send_signal(signal.SIGTERM)
    assert harness.proc.wait(timeout=30) == 0
    lines = [orjson.loads(line) for line in harness.log_text().splitlines()]
    assert [line["url"] for line in lines if line["event"] == "api listening"] == [f"http://127.0.0.1:{port}"]
    assert not [line for line in lines if line["level"] in ("warning", "error")]


def test_an_invocation_joins_the_callers_trace(api: Api) -> None:
    caller = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    parents = {}
    invalid = "00-" + "0" * 32 + "-00f067aa0ba902b7-01"  # an all-zero trace id: the spec says to ignore it
    for name, header in (("traced", caller), ("untraced", None), ("invalid", invalid)):
        r = api.client.post("/v1/functions/echo/invocations", json={"n": name},
                            headers={"traceparent": header} if header else {})  # fmt: skip
        assert r.status_code == 202, r.text
        parents[name] = trace.parse((api.harness.registry.get(r.json()["id"], event=True) or {})["meta"]["traceparent"])
    assert parents["traced"] is not None and parents["traced"][0] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert parents["traced"][1] != "00f067aa0ba902b7"
    for fresh in (parents["untraced"], parents["invalid"]):  # none, or one the spec says to ignore: a new trace
        assert fresh is not None and fresh[0] not in ("4bf92f3577b34da6a3ce929d0e0e4736", "0" * 32)


# -- fuzzing ----------------------------------------------------------------------------------------------------


@pytest.mark.xdist_group("fuzzers-b")  # CPU-bound: with some of the intake fuzzers, on one xdist worker
def test_fuzzing_every_operation_finds_no_server_error(api: Api, subtests: pytest.Subtests) -> None:
    """schemathesis generates requests from the spec, valid (positive) and not (negative), and runs all its
    checks on each response: no 5xx, status codes, content types and bodies as documented, valid data accepted,
    invalid data rejected, and no route served without the token."""
    # Told the token through its auth config, schemathesis also leaves it out (negative), expecting a 401.
    config = schemathesis.Config.from_dict({"auth": {"openapi": {"bearer": {"bearer": TOKEN}}}})
    schema = schemathesis.openapi.from_url(f"{api.url}/openapi.json", config=config, headers=AUTH)
    # Random names and ids are all 404s: also aim at a function and a task that exist.
    existing = {
        "name": "echo",
        "task_id": api.invoke("echo", {"fuzz": True}),
        "pool": "default",
        "model": "any",
        "alias": "fuzz",
        "worker": "gpu0@fuzz-host",
    }
    runs: list[tuple[Any, GenerationMode, dict[str, str]]] = []
    for result in schema.get_all_operations():
        op = result.ok()
        has_input = bool(op.query or op.headers or op.body)
        runs.append((op, GenerationMode.POSITIVE, {}))
        if op.path_parameters or has_input:  # /healthz has nothing to get wrong
            runs.append((op, GenerationMode.NEGATIVE, {}))
        if op.path_parameters:
            fixed = {p.name: existing[p.name] for p in op.path_parameters}
            runs.append((op, GenerationMode.POSITIVE, fixed))
            if has_input:
                runs.append((op, GenerationMode.NEGATIVE, fixed))
    for op, mode, fixed in runs:
        with subtests.test(msg=f"{op.label} {mode.value} {fixed or ''}"):
            statuses = _fuzz(op, mode, fixed)
            # Had the token not been sent, every answer would be a 401 and every check would pass.
            assert mode is GenerationMode.NEGATIVE or set(statuses) - {401}, statuses


def _fuzz(op: Any, mode: GenerationMode, path_parameters: dict[str, str]) -> Counter[int]:
    statuses: Counter[int] = Counter()

    @settings(max_examples=FUZZ_EXAMPLES, database=None, deadline=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])  # fmt: skip
    @given(case=op.as_strategy(generation_mode=mode, path_parameters=path_parameters or None),
           seq=st.integers(0, 2**53))  # fmt: skip
    def check(case: Any, seq: int) -> None:
        # The spec cannot say "a cursor this API issued": any other string is rightly a 422 (bad_cursor).
        if mode is GenerationMode.POSITIVE and case.query and "cursor" in case.query:
            case.query["cursor"] = base64.urlsafe_b64encode(f"s{seq}".encode()).decode().rstrip("=")
        # An event is any JSON whose integers fit 64 bits: JSON Schema cannot say so of numbers a parser may read
        # as floats, so a generated 1e20-as-integer is rightly refused (bad_number) though the spec allows it.
        excluded = [positive_data_acceptance] if case.operation.label.endswith("/invocations") else []
        statuses[case.call_and_validate(excluded_checks=excluded).status_code] += 1

    check()
    return statuses


def test_an_unexpected_error_is_a_logged_500_internal(harness: FleetHarness) -> None:
    """In-process (a real uvicorn server on a thread), so that a route can be made to fail."""

    class Broken(ControlPlane):
        def status(self, task_id: str) -> dict[str, Any]:
            raise RuntimeError(f"boom {task_id}")

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(Broken(harness.fleet()), TOKEN), port=port, log_config=None,
                                           lifespan="off"))  # fmt: skip
    thread = threading.Thread(target=server.run)
    with structlog.testing.capture_logs() as logs:
        thread.start()
        try:
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=AUTH, timeout=30) as client:
                harness.wait_for(lambda: server.started, what="the server to start")
                r = client.get("/v1/tasks/t1")
                assert error_code(r, 500) == "internal"
                assert "boom" not in r.text  # no internals in the answer
                assert error_code(client.get("/v1/tasks/t1/position"), 404) == "task_not_found"  # still serving
        finally:
            server.should_exit = True
            thread.join(timeout=30)
    [line] = [line for line in logs if line["event"] == "unhandled error"]
    assert line["log_level"] == "error" and line["path"] == "/v1/tasks/t1" and line["exc_info"] is True
