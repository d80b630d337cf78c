"""``gpufleet demo``: the main jobs end to end on embedded local services.

1. Starts Redis, a Kafka-protocol broker (tansu) and moto (S3 + SQS) as local processes on free loopback ports,
   with a bucket whose new ``images/*.png`` are announced on an SQS queue.
2. Starts the fleet (``gpufleet run``) with ``config/fleet.yaml`` plus a trigger for that queue.
3. Publishes sample messages to the Kafka trigger's topic (text to embed with torch, a function that fails,
   malformed input) and drops generated images into the bucket (``thumbnail``: torch resizes and measures them,
   and writes thumbnails back to the bucket).
4. Shows progress, then prints the callback records read back from the result topics.
5. Uses the HTTP API: invokes ``gpu_info``, starts a long ``sleep``, watches its progress and cancels it; then runs
   a sharded job (``enhance``: a 4096x4096 image in 8 bands, one failing once) and shows its bands' states.
6. Routes ``embed``'s success records to a signed webhook receiver, an S3 bucket and, when RabbitMQ is installed,
   a RabbitMQ queue (fed by an AMQP trigger): see :mod:`gpufleet.demo.routes`.
7. Stops everything, and prints one summary line: Kafka events, bucket events, API calls, the job and destinations.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import orjson
import yaml

from gpufleet.config import load_fleet
from gpufleet.demo import bucket, routes
from gpufleet.demo.api import api_tour, wait_healthy
from gpufleet.demo.job import job_tour
from gpufleet.registry.store import Registry

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
    msgs = [
        ("embed", orjson.dumps({"function": "embed", "payload": {"text": t}, "id": f"demo-embed-{i}"}))
        for i, t in enumerate(TEXTS)
    ]
    msgs.append(("fail", orjson.dumps({"function": "fail", "payload": {"message": "bad input"}, "id": "demo-fail-0"})))
    msgs.append(("dead", b"{this is not json"))
    msgs.append(("dead", orjson.dumps({"function": "transcode", "payload": {}})))  # no such function
    return msgs


def run_demo(config: Path) -> int:
    from gpufleet.dev.local import LocalServices
    from gpufleet.dev.services import MOTO_ACCESS_KEY, MOTO_SECRET_KEY

    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-demo-"))
    print(f"demo: starting Redis, Kafka (tansu) and S3 + SQS (moto) on loopback; logs in {workdir}")
    with LocalServices(workdir, moto=True) as services, _rabbitmq(workdir) as rabbit_url:
        bucket.setup(services.moto_url)
        bucket.clients(services.moto_url)[0].create_bucket(Bucket=routes.RECORDS_BUCKET)
        hook_secret = secrets.token_urlsafe(32)
        receiver = routes.Receiver(hook_secret)
        routes.write_triggers(workdir / "triggers", receiver, rabbit_url)
        demo_config = _demo_config(config, workdir)
        env = {
            **os.environ,
            "GPUFLEET_REDIS__URL": services.redis_url,
            "GPUFLEET_CONFIG": str(demo_config),
            "GPUFLEET_KAFKA__BOOTSTRAP_SERVERS": services.kafka_bootstrap,
            "GPUFLEET_S3__ENDPOINT_URL": services.moto_url,
            "GPUFLEET_S3__SQS_ENDPOINT_URL": services.moto_url,
            "GPUFLEET_S3__ACCESS_KEY_ID": MOTO_ACCESS_KEY,
            "GPUFLEET_S3__SECRET_ACCESS_KEY": MOTO_SECRET_KEY,
            routes.SECRET_ENV: hook_secret,
            # No token is shipped: the demo makes one for its own run.
            "GPUFLEET_API__TOKEN": os.environ.get("GPUFLEET_API__TOKEN") or secrets.token_urlsafe(32),
        }
        log = open(workdir / "fleet.log", "wb")  # noqa: SIM115 - handed to the child process
        fleet, fleet_proc = _start_fleet(demo_config, env, log)
        topic = next(t.source for t in fleet.triggers.values() if t.enabled and t.source.startswith("kafka:"))
        topic = topic.rsplit("/", 1)[-1]
        try:
            code, summary = _drive(fleet, services.kafka_bootstrap, topic, services.moto_url)
            if fleet.settings.api.enabled:
                api_code, api_summary = api_tour(fleet)
                job_code, job_summary = job_tour(fleet, services.moto_url)
                code, summary = code or api_code or job_code, f"{summary} | {api_summary} | {job_summary}"
            routes.send(services.kafka_bootstrap, rabbit_url)
            routed, routes_summary = routes.report(
                receiver, services.moto_url, rabbit_url, time.monotonic() + TIMEOUT_S
            )
            code, summary = code or (0 if routed else 1), f"{summary} | {routes_summary}"
        finally:
            receiver.close()
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


def _start_fleet(config: Path, env: dict[str, str], log: IO[bytes]) -> tuple[Any, subprocess.Popen[bytes]]:
    """``gpufleet run`` on a free API port, in its own process group (so that we stop it, in order, even on Ctrl-C).
    A free port can be taken by another process before the fleet binds it (the test suite runs the demo beside
    other tests): the fleet then exits at once with EXIT_PORT_IN_USE, and another port is tried."""
    from gpufleet.cli.output import EXIT_PORT_IN_USE
    from gpufleet.dev.services import free_port

    for _ in range(3):
        env["GPUFLEET_API__PORT"] = str(free_port())
        fleet = load_fleet(config, env)
        print(f"demo: starting the fleet: {fleet.settings.worker.virtual_gpus} virtual GPU(s) (no NVIDIA GPU needed)")
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpufleet", "run", "--config", str(config)],
            env=env,
            stdout=log,
            stderr=log,
            process_group=0,
        )
        if not fleet.settings.api.enabled or wait_healthy(fleet, proc) or proc.poll() != EXIT_PORT_IN_USE:
            return fleet, proc
        print(f"demo: API port {fleet.settings.api.port} was taken before the fleet bound it; another one")
    return fleet, proc


@contextlib.contextmanager
def _rabbitmq(workdir: Path) -> Iterator[str | None]:
    """RabbitMQ for the demo's AMQP route, when Debian's rabbitmq-server is installed; None (and one line) if not."""
    from gpufleet.dev.rabbitmq import rabbitmq_available, start_rabbitmq, stop_rabbitmq

    if not rabbitmq_available():
        print("demo: RabbitMQ is not installed, so the AMQP part is skipped (apt-get install rabbitmq-server)")
        yield None
        return
    print("demo: starting RabbitMQ for the AMQP part")
    service, pids = start_rabbitmq(workdir / "rabbitmq")
    try:
        routes.declare_queues(service.url)
        yield service.url
    finally:
        stop_rabbitmq(pids)


def _demo_config(config: Path, workdir: Path) -> Path:
    """The user's fleet file, with absolute folders and one more trigger folder: the demo bucket's trigger."""
    raw = yaml.safe_load(config.read_text()) or {}
    base = config.resolve().parent
    raw["functions"] = [str((base / p).resolve()) for p in raw.get("functions", ["../workers"])]
    raw["triggers"] = [str((base / p).resolve()) for p in raw.get("triggers", ["../triggers"])]
    raw["triggers"].append(str(workdir / "triggers"))
    bucket.write_trigger(workdir / "triggers")
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


def _publish(bootstrap: str, topic: str, s3_url: str) -> tuple[list[tuple[str, bytes]], int]:
    """The demo's events: sample messages to Kafka, PNG images to the bucket. Returns the messages and the images'
    count."""
    from kafka import KafkaProducer

    messages = sample_messages()
    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for _, value in messages:
        producer.send(topic, value)
    producer.flush()
    producer.close()
    print(f"demo: published {len(messages)} messages to Kafka topic {topic!r}")
    n_images = bucket.upload_images(s3_url)
    print(f"demo: uploaded {n_images} PNG images to s3://{bucket.BUCKET}/images/ (notifications go to SQS)")
    return messages, n_images


def _show(kafka_records: list[dict[str, Any]], dead: list[dict[str, Any]]) -> None:
    print("\nKafka events -> callback records:")
    for body in kafka_records:
        ctx, resp, out = body["requestContext"], body["responseContext"], body["responsePayload"]
        ok = ctx["condition"] == "Success"
        detail = f"head={out['head'][:3]}" if ok else f"{out['errorType']}: {out['errorMessage']}"
        n, gpu, ms = ctx["approximateInvokeCount"], resp["gpu"], resp["durationMs"]
        print(f"  {ctx['condition']:<16} {ctx['requestId']:<14} {ctx['function']:<6} n={n} {gpu} {ms:.0f}ms {detail}")
    for r in dead:
        print(f"  dead-letter      reason={r['headers'].get('reason')}  original={r['value'][:40]!r}")


def _drive(fleet: Any, bootstrap: str, topic: str, s3_url: str) -> tuple[int, str]:
    messages, n_images = _publish(bootstrap, topic, s3_url)
    s = fleet.settings
    registry = Registry.from_url(s.redis.url, s.redis.key_prefix)
    expected = {
        "embed": sum(k == "embed" for k, _ in messages),
        "fail": sum(k == "fail" for k, _ in messages),
        "thumbnail": n_images,
    }
    deadline = time.monotonic() + TIMEOUT_S
    while time.monotonic() < deadline:
        line, finished = _progress(registry, expected)
        print(f"demo: {line}", flush=True)
        if finished:
            break
        time.sleep(1)

    n_dead = sum(k == "dead" for k, _ in messages)
    topics = {"success": s.defaults.on_success, "failure": s.defaults.on_failure, "dead": s.defaults.dead_letter}
    topics = {k: v.rsplit("/", 1)[-1] for k, v in topics.items()}
    want = {
        topics["success"]: expected["embed"] + n_images,
        topics["failure"]: expected["fail"],
        topics["dead"]: n_dead,
    }
    records = read_topics(bootstrap, set(topics.values()), want, deadline)
    bodies = [orjson.loads(r["value"]) for r in records[topics["success"]] + records[topics["failure"]]]
    kafka_records = [b for b in bodies if b["requestContext"]["function"] != "thumbnail"]
    thumbs = [b for b in bodies if b["requestContext"]["function"] == "thumbnail"]
    dead = records[topics["dead"]]
    _show(kafka_records, dead)
    n_thumbs = bucket.report(s3_url, [b for b in thumbs if b["requestContext"]["condition"] == "Success"])
    if thumbs:
        print("\none bucket-event success record, in full:")
        print(orjson.dumps(thumbs[0], option=orjson.OPT_INDENT_2).decode())

    def count(group: list[dict[str, Any]], condition: str) -> int:
        return sum(b["requestContext"]["condition"] == condition for b in group)

    n_ok, n_failed = count(kafka_records, "Success"), count(kafka_records, "RetriesExhausted")
    n_bucket_ok = count(thumbs, "Success")
    summary = (
        f"demo: kafka {len(messages)} events: {n_ok} Success, {n_failed} RetriesExhausted, {len(dead)} "
        f"dead-lettered | bucket {n_images} objects: {n_bucket_ok} Success, {n_thumbs} thumbnails"
    )
    complete = (n_ok, n_failed, len(dead), n_bucket_ok, n_thumbs) == (
        expected["embed"],
        expected["fail"],
        n_dead,
        n_images,
        n_images,
    )
    return (0 if complete else 1), summary


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
                        out[tp.topic] += [
                            {"key": r.key, "value": r.value, "headers": {k: v.decode() for k, v in r.headers}}
                            for r in recs
                        ]
                if all(len(out.get(t, [])) >= n for t, n in want.items()):
                    break
            time.sleep(0.5)
    finally:
        consumer.close()
    return out
