"""What a sharded job costs over the same work sent as separate tasks, in the same run.

    .venv/bin/python bench/jobs.py [--shards 200] [--ms 20] [--turns 3]

Starts Redis and Kafka (``LocalServices``) and one ``gpufleet worker`` host with 2 virtual GPUs. Each turn runs the
same work twice: ``--shards`` tasks of ``piece`` (a ``--ms`` sleep) invoked one by one, then one ``whole`` job that
splits into as many ``piece`` shards and merges them. Each side is timed from just before its first invocation to
the last record's ``finished_at`` (the tasks') or the job's. Printed: both times per turn, the job's time over the
tasks', and the job's cost per shard ((job - tasks) / shards), as a Markdown table; also in
``bench/results/jobs.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

import yaml  # noqa: E402 - after the path is set

from gpufleet.config import load_fleet  # noqa: E402
from gpufleet.control.plane import ControlPlane  # noqa: E402
from gpufleet.dev.local import LocalServices  # noqa: E402

RESULTS = ROOT / "bench" / "results" / "jobs.md"
FUNCTIONS = """
import time
from gpufleet import function, job

@function(name="piece", max_attempts=1)
def piece(event, ctx):
    time.sleep(event["ms"] / 1000)
    return {"i": event["i"]}

@job(name="whole", shard=piece, max_shards=10000, max_attempts=1)
def whole(event, ctx):
    return [{"i": i, "ms": event["ms"]} for i in range(event["n"])]

@whole.merge
def merged(event, results, ctx):
    return len(results)
"""


def main() -> int:
    args = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    args.add_argument("--shards", type=int, default=200)
    args.add_argument("--ms", type=float, default=20.0)
    args.add_argument("--turns", type=int, default=3)
    opts = args.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-bench-jobs-"))
    with LocalServices(workdir) as services:
        config = write_fleet(workdir, services.redis_url, services.kafka_bootstrap)
        env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")} | {"CUDA_VISIBLE_DEVICES": ""}
        log = open(workdir / "worker.log", "wb")  # noqa: SIM115 - the child writes to it
        worker = subprocess.Popen([sys.executable, "-m", "gpufleet", "worker", "--config", str(config)], env=env,
                                  stdout=log, stderr=log, process_group=0)  # fmt: skip
        try:
            plane = ControlPlane(load_fleet(config, env))
            wait(lambda: sum(1 for g in plane.gpus() if g.get("ready") or g.get("up")) >= 2, 120, "2 GPUs")
            # The sides alternate which goes first, so drift on a noisy machine hits both alike.
            rows = [turn(plane, opts.shards, opts.ms, job_first=k % 2 == 1) for k in range(opts.turns)]
        finally:
            worker.terminate()
            worker.wait(60)
            log.close()
    report(rows, opts.shards, opts.ms)
    return 0


def write_fleet(workdir: Path, redis_url: str, bootstrap: str) -> Path:
    (workdir / "functions").mkdir()
    (workdir / "triggers").mkdir()
    (workdir / "functions" / "jobbench.py").write_text(FUNCTIONS)
    config = {
        "redis": {"url": redis_url, "key_prefix": "jobbench"},
        "kafka": {"bootstrap_servers": bootstrap},
        "worker": {"virtual_gpus": 2, "pools": ["default"]},
        "defaults": {
            "on_success": "kafka:///bench.success",
            "on_failure": "kafka:///bench.failure",
            "dead_letter": "kafka:///bench.dead-letter",
        },
        "logging": {"level": "warning", "format": "json"},
        "functions": [str(workdir / "functions")],
        "triggers": [str(workdir / "triggers")],
    }
    path = workdir / "fleet.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def wait(cond: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not cond():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.05)


def turn(plane: ControlPlane, n: int, ms: float, job_first: bool) -> tuple[float, float]:
    """(tasks' seconds, job's seconds) for the same work."""

    def tasks() -> float:
        start = time.time()
        ids = [plane.invoke("piece", {"i": i, "ms": ms}).id for i in range(n)]
        wait(lambda: all(r and r["state"] == "SUCCEEDED" for r in plane.registry.get_many(ids)), 600, "the tasks")
        return max(float(r["finished_at"]) for r in plane.registry.get_many(ids) if r) - start

    def job() -> float:
        start = time.time()
        job = plane.invoke("whole", {"n": n, "ms": ms}).id
        wait(lambda: (plane.registry.get(job) or {}).get("state") == "SUCCEEDED", 600, "the job")
        return float(plane.registry.get(job)["finished_at"]) - start  # type: ignore[index]

    if job_first:
        job_s, tasks_s = job(), tasks()
    else:
        tasks_s, job_s = tasks(), job()
    print(f"turn: {n} tasks {tasks_s:.3f} s, one job of {n} shards {job_s:.3f} s ({job_s / tasks_s:.2f}x)")
    return tasks_s, job_s


def report(rows: list[tuple[float, float]], n: int, ms: float) -> None:
    tasks, jobs = [r[0] for r in rows], [r[1] for r in rows]
    ratios = [j / t for t, j in rows]
    per_shard = [(j - t) / n * 1000 for t, j in rows]
    ideal = n * ms / 1000 / 2
    lines = [
        f"{n} x {ms:g} ms on 2 virtual GPUs (ideal {ideal:.2f} s), {len(rows)} turns, same run:",
        "",
        "| figure | mean | range |",
        "|---|---|---|",
        f"| {n} separate tasks, first invoke to last finish | {statistics.mean(tasks):.3f} s | "
        f"{min(tasks):.3f}-{max(tasks):.3f} s |",
        f"| one job of {n} shards (split, shards, merge) | {statistics.mean(jobs):.3f} s | "
        f"{min(jobs):.3f}-{max(jobs):.3f} s |",
        f"| job / tasks | {statistics.mean(ratios):.2f}x | {min(ratios):.2f}-{max(ratios):.2f}x |",
        f"| the job's cost per shard | {statistics.mean(per_shard):+.2f} ms | "
        f"{min(per_shard):+.2f} to {max(per_shard):+.2f} ms |",
    ]
    print("\n".join(lines))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
