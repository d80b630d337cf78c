"""``gpufleet demo``: the main job end to end on embedded local services.

1. Starts Redis and a Kafka-protocol broker (tansu) as local processes on free loopback ports.
2. Starts the fleet (``gpufleet run``: dispatcher, GPU workers, trigger) with ``config/fleet.yaml``.
3. Publishes sample messages to the trigger's topic: text to embed with torch, a function that fails, and
   malformed input.
4. Shows progress, then prints the callback records read back from the result topics.
5. Uses the HTTP API: invokes ``gpu_info``, starts a long ``sleep``, watches its progress and cancels it.
6. Stops everything, and prints ``demo: <sent> events, <n> Success, <m> RetriesExhausted, <k> dead-lettered``
   and what the API calls ended as.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import orjson

from gpufleet.registry import Registry
from gpufleet.settings import load_fleet

TEXTS = [
    "GPUs turn events into results",
    "a file lands in a bucket",
    "a message lands on a topic",
    "one task per GPU at a time",
    "the callback carries the task id",
    "nothing is lost when a worker dies",
]
TIMEOUT_S = 120


def sample_messages() -> list[tuple[str, bytes]]:
    """(kind, bytes) for each message the demo publishes."""
    msgs = [("embed", orjson.dumps({"function": "embed", "payload": {"text": t}, "id": f"demo-embed-{i}"}))
            for i, t in enumerate(TEXTS)]  # fmt: skip
    msgs.append(("fail", orjson.dumps({"function": "fail", "payload": {"message": "bad input"}, "id": "demo-fail-0"})))
    msgs.append(("dead", b"{this is not json"))
    msgs.append(("dead", orjson.dumps({"function": "transcode", "payload": {}})))  # no such function
    return msgs


def run_demo(config: Path) -> int:
    from gpufleet.dev.services import LocalServices, free_port

    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-demo-"))
    print(f"demo: starting Redis and Kafka (tansu) on loopback; logs in {workdir}")
    with LocalServices(workdir) as services:
        env = {**os.environ, "GPUFLEET_REDIS__URL": services.redis_url, "GPUFLEET_CONFIG": str(config),
               "GPUFLEET_KAFKA__BOOTSTRAP_SERVERS": services.kafka_bootstrap,
               "GPUFLEET_API__PORT": str(free_port())}  # fmt: skip
        fleet = load_fleet(config, env)
        trigger = next(iter(fleet.triggers.values()))
        topic = trigger.source.split("/")[-1]
        print(f"demo: starting the fleet: {fleet.settings.worker.virtual_gpus} virtual GPU(s) (no NVIDIA GPU needed)")
        log = open(workdir / "fleet.log", "wb")  # noqa: SIM115 - handed to the child process
        # Own process group, so the fleet is stopped by us, in order, even on Ctrl-C.
        fleet_proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "run", "--config", str(config)],
                                      env=env, stdout=log, stderr=log, process_group=0)  # fmt: skip
        try:
            code, summary = _drive(fleet, services.kafka_bootstrap, topic)
            if fleet.settings.api.enabled:
                api_code, api_summary = _api_tour(fleet)
                code, summary = code or api_code, f"{summary} | {api_summary}"
        finally:
            print("demo: stopping the fleet and the local services")
            fleet_proc.send_signal(signal.SIGTERM)
            try:
                fleet_proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                fleet_proc.kill()
                fleet_proc.wait()
            log.close()
    print(summary)
    return code


def _drive(fleet: Any, bootstrap: str, topic: str) -> tuple[int, str]:
    from kafka import KafkaProducer

    messages = sample_messages()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for _, value in messages:
        producer.send(topic, value)
    producer.flush()
    producer.close()
    print(f"demo: published {len(messages)} messages to Kafka topic {topic!r}")

    s = fleet.settings
    registry = Registry.from_url(s.redis.url, s.redis.key_prefix)
    expected = {"embed": sum(k == "embed" for k, _ in messages), "fail": sum(k == "fail" for k, _ in messages)}
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        line, finished = _progress(registry, expected)
        print(f"demo: {line}", flush=True)
        if finished:
            break
        time.sleep(1)

    want = {"gpufleet.success": expected["embed"], "gpufleet.failure": expected["fail"],
            "gpufleet.dead-letter": sum(k == "dead" for k, _ in messages)}  # fmt: skip
    topics = {"success": s.defaults.on_success, "failure": s.defaults.on_failure, "dead": s.defaults.dead_letter}
    records = read_topics(bootstrap, {t.split("/")[-1] for t in topics.values()}, want, deadline)
    success = records.get(topics["success"].split("/")[-1], [])
    failure = records.get(topics["failure"].split("/")[-1], [])
    dead = records.get(topics["dead"].split("/")[-1], [])
    print("\ncallback records:")
    for r in success + failure:
        body = orjson.loads(r["value"])
        ctx, resp = body["requestContext"], body["responseContext"]
        out = body["responsePayload"]
        ok = ctx["condition"] == "Success"
        detail = f"head={out['head'][:3]}" if ok else f"{out['errorType']}: {out['errorMessage']}"
        n, gpu, ms = ctx["approximateInvokeCount"], resp["gpu"], resp["durationMs"]
        print(f"  {ctx['condition']:<16} {ctx['requestId']:<14} {ctx['function']:<6} n={n} {gpu} {ms:.0f}ms {detail}")
    for r in dead:
        print(f"  dead-letter      reason={r['headers'].get('reason')}  original={r['value'][:40]!r}")
    if success:
        print("\none success record, in full:")
        print(orjson.dumps(orjson.loads(success[0]["value"]), option=orjson.OPT_INDENT_2).decode())
    n_ok = sum(orjson.loads(r["value"])["requestContext"]["condition"] == "Success" for r in success)
    n_failed = sum(orjson.loads(r["value"])["requestContext"]["condition"] == "RetriesExhausted" for r in failure)
    summary = f"demo: {len(messages)} events, {n_ok} Success, {n_failed} RetriesExhausted, {len(dead)} dead-lettered"
    complete = n_ok == expected["embed"] and n_failed == expected["fail"] and len(dead) == want["gpufleet.dead-letter"]
    return (0 if complete else 1), summary


def _api_tour(fleet: Any) -> tuple[int, str]:
    """The control plane over HTTP: invoke, follow progress, cancel."""
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

    deadline = time.monotonic() + 30
    while True:
        try:
            if call("GET", "/healthz")[0] == 200:
                break
        except OSError:
            pass
        if time.monotonic() > deadline:
            return 1, "api: not reachable"
        time.sleep(0.5)
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
                print(f"  GET /v1/tasks/{task_id} -> RUNNING, progress {view['progress']['fraction']:.0%} "
                      f"({view['progress']['message']})")  # fmt: skip
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


def _progress(registry: Registry, expected: dict[str, int]) -> tuple[str, bool]:
    parts = []
    finished = True
    for fn, total in expected.items():
        c = registry.counts(fn)
        done = c.get("SUCCEEDED", 0) + c.get("FAILED", 0)
        bar = "#" * done + "." * max(total - done, 0)
        parts.append(f"{fn} [{bar}] {done}/{total} done, {c.get('RUNNING', 0)} running, {c.get('QUEUED', 0)} queued")
        finished = finished and done >= total
    return " | ".join(parts), finished


def read_topics(
    bootstrap: str, topics: set[str], want: dict[str, int], deadline: float
) -> dict[str, list[dict[str, Any]]]:
    """Read each topic from the beginning until it holds ``want[topic]`` records or the deadline passes."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    out: dict[str, list[dict[str, Any]]] = {t: [] for t in topics}
    try:
        while time.monotonic() < deadline:
            parts = [TopicPartition(t, p) for t in topics for p in (consumer.partitions_for_topic(t) or [])]
            if parts:
                consumer.assign(parts)
                consumer.seek_to_beginning(*parts)
                out = {t: [] for t in topics}
                end = time.monotonic() + 2
                while time.monotonic() < end:
                    for tp, recs in consumer.poll(timeout_ms=200).items():
                        out[tp.topic] += [{"key": r.key, "value": r.value,
                                           "headers": {k: v.decode() for k, v in r.headers}} for r in recs]  # fmt: skip
                if all(len(out.get(t, [])) >= n for t, n in want.items()):
                    break
            time.sleep(0.5)
    finally:
        consumer.close()
    return out
