"""The demo's destinations part: ``embed``'s success records also go to a local webhook receiver and to an S3
bucket, and, when RabbitMQ is installed, through RabbitMQ both ways (an AMQP trigger in, an AMQP destination out).

Each route is a trigger of its own, because a trigger's ``on_success`` wins over the function's and the fleet's:

- ``demo-webhook``: Kafka topic ``demo.to-webhook`` -> ``embed`` -> ``http://127.0.0.1:PORT/records``, signed with
  the secret in ``DEMO_HOOK_SECRET``; the receiver here checks every signature;
- ``demo-s3``: Kafka topic ``demo.to-s3`` -> ``embed`` -> ``s3://gpufleet-demo-records/embed/<task id>.json``;
- ``demo-amqp``: RabbitMQ queue ``demo.requests`` -> ``embed`` -> queue ``demo.results`` (the default exchange).
"""

from __future__ import annotations

import contextlib
import hmac
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import orjson
import yaml

from gpufleet.credentials import sign_delivery
from gpufleet.urls import amqp_login

SECRET_ENV = "DEMO_HOOK_SECRET"  # noqa: S105 - the name of the variable, not a secret
RECORDS_BUCKET = "gpufleet-demo-records"
TOPICS = {"webhook": "demo.to-webhook", "s3": "demo.to-s3"}
AMQP_IN, AMQP_OUT = "demo.requests", "demo.results"
PER_ROUTE = 2


class Receiver:
    """A webhook receiver on loopback that keeps each record whose signature is right, by task id (delivery is at
    least once, so a record may come twice), and counts the others."""

    def __init__(self, secret: str) -> None:
        self.records: dict[str, dict[str, Any]] = {}
        self.refused = 0
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                stamp = self.headers.get("X-Gpufleet-Timestamp", "")
                task_id = self.headers.get("X-Gpufleet-Task-Id", "")
                expected = sign_delivery(secret, task_id, body, stamp)
                ok = (
                    stamp.isdigit()
                    and abs(time.time() - int(stamp)) < 300
                    and hmac.compare_digest(self.headers.get("X-Gpufleet-Signature", ""), expected)
                )
                if ok:
                    receiver.records[task_id] = orjson.loads(body)
                else:
                    receiver.refused += 1
                self.send_response(204 if ok else 401)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/records#secret_env={SECRET_ENV}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def write_triggers(folder: Path, receiver: Receiver, rabbit_url: str | None) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    routes = {
        "demo-webhook": {"source": f"kafka:///{TOPICS['webhook']}", "on_success": receiver.url},
        "demo-s3": {"source": f"kafka:///{TOPICS['s3']}", "on_success": f"s3://{RECORDS_BUCKET}/embed"},
    }
    if rabbit_url:
        routes["demo-amqp"] = {
            "source": f"{rabbit_url}?queue={AMQP_IN}",
            "on_success": f"{rabbit_url}?routing_key={AMQP_OUT}",
        }
    for name, route in routes.items():
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({"function": "embed", **route}))


def declare_queues(rabbit_url: str) -> None:
    with _channel(rabbit_url) as channel:
        for queue in (AMQP_IN, AMQP_OUT):
            channel.queue_declare(queue, durable=True, auto_delete=False)


def send(bootstrap: str, rabbit_url: str | None) -> None:
    """``PER_ROUTE`` texts to embed, per route."""
    from kafka import KafkaProducer

    producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    for route, topic in TOPICS.items():
        for i in range(PER_ROUTE):
            producer.send(topic, orjson.dumps({"text": f"a record for the {route} destination", "id": f"{route}-{i}"}))
    producer.flush()
    producer.close()
    if rabbit_url:
        import amqp

        with _channel(rabbit_url) as channel:
            for i in range(PER_ROUTE):
                body = orjson.dumps({"text": "a message from RabbitMQ", "id": f"amqp-{i}"})
                channel.basic_publish(amqp.Message(body, delivery_mode=2), routing_key=AMQP_IN)


def report(receiver: Receiver, s3_url: str, rabbit_url: str | None, deadline: float) -> tuple[bool, str]:
    """Wait until every route delivered (or the deadline), print what arrived; (complete, summary part)."""
    from gpufleet.demo.bucket import clients

    s3, _ = clients(s3_url)
    objects: list[str] = []
    results: dict[str, dict[str, Any]] = {}  # by task id, as the webhook's
    while time.monotonic() < deadline:
        objects = [o["Key"] for o in s3.list_objects_v2(Bucket=RECORDS_BUCKET).get("Contents", [])]
        if rabbit_url:
            results |= _drain(rabbit_url)
        if (
            len(receiver.records) >= PER_ROUTE
            and len(objects) >= PER_ROUTE
            and (not rabbit_url or len(results) >= PER_ROUTE)
        ):
            break
        time.sleep(0.5)
    print("\nembed's success records, routed by their trigger:")
    for record in receiver.records.values():
        ctx = record["requestContext"]
        print(f"  webhook, signature checked  {ctx['requestId']}  {ctx['condition']}")
    for key in objects:
        print(f"  s3://{RECORDS_BUCKET}/{key}")
    for record in results.values():
        ctx = record["requestContext"]
        print(f"  amqp queue {AMQP_OUT}  {ctx['requestId']}  {ctx['condition']}")
    if not rabbit_url:
        print("  amqp: skipped, RabbitMQ is not installed (apt-get install rabbitmq-server)")
    parts = [f"webhook {len(receiver.records)} signed", f"s3 {len(objects)} objects"]
    parts.append(f"amqp {len(results)} messages" if rabbit_url else "amqp skipped")
    complete = len(receiver.records) == len(objects) == PER_ROUTE and receiver.refused == 0
    complete = complete and (not rabbit_url or len(results) == PER_ROUTE)
    return complete, "destinations: " + ", ".join(parts)


def _drain(rabbit_url: str) -> dict[str, dict[str, Any]]:
    """The records waiting in the results queue, by task id (the message id the destination sets)."""
    out = {}
    with _channel(rabbit_url) as channel:
        while (msg := channel.basic_get(AMQP_OUT, no_ack=True)) is not None:
            out[str(msg.properties.get("message_id", ""))] = orjson.loads(bytes(msg.body))
    return out


@contextlib.contextmanager
def _channel(url: str) -> Iterator[Any]:
    import amqp

    conn = amqp.Connection(**amqp_login(url, None))
    conn.connect()
    try:
        yield conn.channel()
    finally:
        conn.close()
