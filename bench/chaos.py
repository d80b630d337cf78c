"""gpufleet chaos benchmark: what survives kills, freezes and hostile input, at scale.

    python bench/chaos.py                      # 20,000 events and 10,000 bad inputs, about 5 minutes on 2 cores
    python bench/chaos.py --events 2000 --bad 1000    # a quick look

Starts Redis and Kafka (``LocalServices``) in a temporary folder and runs the roles as separate processes
(``tests/chaos.py``). While the events flow, a pool process is SIGKILLed every 3 s, the trigger and the dispatcher
are killed and restarted in turn every 10 s, and every 30 s the whole worker tree is frozen (SIGSTOP) for 3 s, then
killed and started again. Meanwhile hypothesis-generated bad inputs go to the JSON trigger and to an S3-notification
trigger (``format: s3``). The report goes to stdout and to ``bench/results/chaos.md``.
"""

from __future__ import annotations

import argparse
import signal
import sys
import tempfile
import threading
import time
import uuid
import warnings
from collections import Counter
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import yaml  # noqa: E402 - after the path is set
from hypothesis import HealthCheck, Phase, given, seed, settings  # noqa: E402
from tests.chaos import Chaos, ChaosFleet, Plan, topic_records  # noqa: E402
from tests.strategies import JSON_MESSAGES, notifications  # noqa: E402

from gpufleet.dev.local import LocalServices  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "chaos.md"


def generate(strategy: Any, n: int, at: int) -> list[bytes]:
    """``n`` inputs drawn from a hypothesis strategy (generation only: no shrinking, no database)."""
    out: list[bytes] = []

    @seed(at)
    @settings(max_examples=n, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))  # fmt: skip
    @given(strategy)
    def collect(value: bytes) -> None:
        out.append(value)

    collect()
    return out


def send_bad(bootstrap: str, fleet: ChaosFleet, inputs: dict[str, list[bytes]], over_s: float) -> None:
    from kafka import KafkaProducer

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        producer = KafkaProducer(bootstrap_servers=bootstrap, acks="all", linger_ms=5,
                                 max_request_size=8 * 1024 * 1024)  # fmt: skip
    try:
        pairs = [(fleet.topic(topic), value) for topic, values in inputs.items() for value in values]
        pause = over_s / max(1, len(pairs))
        for i, (topic, value) in enumerate(pairs):
            producer.send(topic, value)
            if i % 100 == 0:
                time.sleep(pause * 100)
        producer.flush()
    finally:
        producer.close()


def consumed(bootstrap: str, group: str, topic: str) -> int:
    """How many messages of ``topic`` the consumer group has committed (the sum of its next offsets). Read as a
    member that never joins: its offsets only, no rebalance of the trigger's group."""
    from kafka import KafkaConsumer, TopicPartition

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        consumer = KafkaConsumer(bootstrap_servers=bootstrap, group_id=group, enable_auto_commit=False)
    try:
        parts = consumer.partitions_for_topic(topic) or set()
        return sum(consumer.committed(TopicPartition(topic, p)) or 0 for p in parts)
    except Exception:  # noqa: BLE001 - a broker being restarted: not settled yet
        return 0
    finally:
        consumer.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=20_000)
    parser.add_argument("--bad", type=int, default=10_000, help="bad inputs, half JSON, half S3 notifications")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanup below: stop what was started
    plan = Plan(events=args.events, produce_s=max(20.0, args.events / 120), task_s=0.005, pool_kill_every_s=3,
                role_kill_every_s=10, freeze_every_s=30, freeze_s=3, lease_s=3, settle_timeout_s=1800)  # fmt: skip
    print(f"generating {args.bad} bad inputs...", file=sys.stderr)
    bad = {
        "requests": generate(JSON_MESSAGES, args.bad // 2, 1),
        "objects": generate(notifications(), args.bad // 2, 2),
    }
    with tempfile.TemporaryDirectory(prefix="gpufleet-chaos-") as tmp:
        services = LocalServices(Path(tmp) / "services")
        services.start()
        try:
            fleet = ChaosFleet(Path(tmp), services.redis_url, services.kafka_bootstrap, f"ch{uuid.uuid4().hex[:6]}",
                               plan)  # fmt: skip
            objects = {"source": f"kafka:///{fleet.topic('objects')}", "format": "s3", "function": "chaos",
                       "group": f"{fleet.prefix}-objects"}  # fmt: skip
            (Path(tmp) / "triggers" / "objects.yaml").write_text(yaml.safe_dump(objects))
            chaos = Chaos(fleet)
            sender = threading.Thread(target=send_bad, args=(services.kafka_bootstrap, fleet, bad, plan.produce_s))
            started = time.monotonic()
            print(f"chaos: {plan.events} events over {plan.produce_s:.0f} s...", file=sys.stderr)
            sender.start()
            # The dead letters are counted once the triggers have read every input (their groups' committed
            # offsets add up to what was sent): stopped earlier, the count moved between runs of the same inputs.
            sent = {"requests": plan.events + len(bad["requests"]), "objects": len(bad["objects"])}
            report = chaos.run(settled=lambda: not sender.is_alive() and all(
                consumed(services.kafka_bootstrap, f"{fleet.prefix}-{topic}", fleet.topic(topic)) >= n
                for topic, n in sent.items()))  # fmt: skip
            sender.join()
            elapsed = time.monotonic() - started
            # One per source: a restarted trigger may dead-letter a message again.
            letters = {h.get("source", ""): h.get("reason", "")
                       for _, _, h in topic_records(services.kafka_bootstrap, fleet.topic("dlq"))}  # fmt: skip
        finally:
            services.stop()
    text = render(plan, report, args.bad, len(letters), Counter(letters.values()), elapsed)
    print(text)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text + "\n")
    return 0 if not report.lost and not report.duplicate_success and not report.trigger_exits else 1


def render(plan: Plan, report: Any, bad: int, dead_sources: int, reasons: Counter[str], elapsed: float) -> str:
    det = sorted(report.detection_s)
    median = det[len(det) // 2] if det else 0.0
    rows = [
        ("events sent", report.sent),
        ("lost (not SUCCEEDED)", len(report.lost)),
        ("tasks with two different Success records", len(report.duplicate_success)),
        ("identical Success records delivered again (at-least-once)", report.redelivered_copies),
        ("tasks run more than once", report.run_twice),
        ("... of which a kill or freeze explains", report.run_twice_explained),
        ("events that ran in a batch call with others (chaos-batch, a seventh of the events)", report.batched),
        ("lost-worker detection, kill -> re-run start, median / max (s)", f"{median:.2f} / {max(det, default=0):.2f}"),
        ("kills", ", ".join(f"{k} {v}" for k, v in sorted(report.kills.items()))),
        ("bad inputs sent (JSON + S3 notifications)", bad),
        ("... dead-lettered with a reason (distinct sources)", dead_sources),
        ("... the rest: valid after all (tasks) or ignored (TestEvent)", bad - dead_sources),
        ("dead-letter reasons", ", ".join(f"{k} {v}" for k, v in reasons.most_common())),
        ("trigger exits (other than our kills)", report.trigger_exits),
        ("wall time (s)", f"{elapsed:.0f}"),
    ]
    lines = [f"# gpufleet chaos run ({time.strftime('%Y-%m-%d %H:%M')})", "",
             f"lease_s {plan.lease_s:g}, tasks of {plan.task_s * 1000:g} ms on {plan.virtual_gpus} virtual GPUs", "",
             "| figure | value |", "|---|---|"]  # fmt: skip
    lines += [f"| {name} | {value} |" for name, value in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
