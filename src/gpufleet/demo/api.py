"""The demo's HTTP part: invoke ``gpu_info``, start a long ``sleep``, watch its progress, cancel it."""

from __future__ import annotations

import contextlib
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any

import orjson

Call = Callable[..., tuple[int, Any]]  # (method, path, body=None) -> (status, decoded JSON)


def client(fleet: Any) -> tuple[str, Call]:
    """The API's base URL, and a call to it with the fleet's token."""
    api = fleet.settings.api
    base, token = f"http://{api.host}:{api.port}", api.token

    def call(method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
        req = urllib.request.Request(base + path, data=data, method=method, headers=headers)  # noqa: S310 - loopback
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:  # noqa: S310 - loopback
                return resp.status, orjson.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, orjson.loads(exc.read() or b"null")

    return base, call


def wait_healthy(fleet: Any, proc: subprocess.Popen[bytes], timeout_s: float = 90) -> bool:
    """Whether the fleet's API answers ``/healthz`` within ``timeout_s``; False at once if the fleet exits."""
    _, call = client(fleet)
    deadline = time.monotonic() + timeout_s
    while proc.poll() is None and time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if call("GET", "/healthz")[0] == 200:
                return True
        time.sleep(0.25)
    return False


def api_tour(fleet: Any) -> tuple[int, str]:
    """The control plane over HTTP: invoke, follow progress, cancel."""
    base, call = client(fleet)
    try:
        call("GET", "/healthz")
    except OSError:
        return 1, "api: not reachable"
    print(f"\ndemo: HTTP API at {base} (Authorization: Bearer <api.token>)")
    _, info = call("POST", "/v1/functions/gpu_info/invocations", {})
    print(f"  POST /v1/functions/gpu_info/invocations -> 202 {info}")
    _, sleeper = call("POST", "/v1/functions/sleep/invocations", {"seconds": 60})
    print(f"  POST /v1/functions/sleep/invocations {{'seconds': 60}} -> 202 {sleeper}")
    ids = {"gpu_info": info["id"], "sleep": sleeper["id"]}
    final: dict[str, dict[str, Any]] = {}
    cancelled = False
    deadline = time.monotonic() + 60
    while len(final) < len(ids) and time.monotonic() < deadline:
        for name, task_id in ids.items():
            _, view = call("GET", f"/v1/tasks/{task_id}")
            if view["state"] not in ("QUEUED", "RUNNING"):
                final[name] = view
            elif name == "sleep" and not cancelled and view["progress"]["fraction"] > 0.02:
                print(
                    f"  GET /v1/tasks/{task_id} -> RUNNING, progress {view['progress']['fraction']:.0%} "
                    f"({view['progress']['message']})"
                )
                _, outcome = call("POST", f"/v1/tasks/{task_id}/cancel")
                print(f"  POST /v1/tasks/{task_id}/cancel -> {outcome}")
                cancelled = True
        time.sleep(0.3)
    for name, view in final.items():
        detail = view["result"] if view["state"] == "SUCCEEDED" else (view["error"] or {}).get("errorMessage")
        print(f"  {name:<8} {view['state']:<10} on {view['worker']}: {orjson.dumps(detail).decode()[:160]}")
    ok = final.get("gpu_info", {}).get("state") == "SUCCEEDED" and final.get("sleep", {}).get("state") == "CANCELLED"
    states = ", ".join(f"{name} {view['state']}" for name, view in sorted(final.items()))
    return (0 if ok else 1), f"api: {states or 'no outcome'}"
