"""Warm models, routed to: cold starts and latency with affinity against the same traffic without it.

    .venv/bin/python bench/warm_models.py [--tasks N] [--rate R] [--seed S] [--cold-wait 5,10]

8 functions, each with a 2 s setup(), on 2 virtual GPUs whose workers keep 2 loaded each (``worker.warm_functions``),
with Zipf traffic (s = 1.1) at ``--rate`` tasks a second, each 0.1 s of work. Runs on the same arrivals: with
affinity, for each ``--cold-wait`` (``worker.cold_wait_s``: the longest a task waits for a worker that has its
function loaded), and without (``cold_wait_s`` 0: a worker reads its queues as they come and loads whatever it
gets, as a worker that knows nothing of warm models does). Printed: the cold starts (setup() runs after boot), and
the latency from invocation to outcome.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from gpufleet.config import load_fleet  # after the path: it runs from a checkout
from gpufleet.control.plane import ControlPlane
from gpufleet.dev.local import LocalServices

BENCH = Path(__file__).resolve().parent
FUNCTIONS = [f"f{i}" for i in range(8)]
TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"}


def arrivals(n: int, rate: float, seed: int) -> list[tuple[float, str]]:
    """(seconds from the start, function): Poisson arrivals, functions by a Zipf law over f0 .. f7."""
    rng = random.Random(seed)
    weights = [1 / (k + 1) ** 1.1 for k in range(len(FUNCTIONS))]
    t, out = 0.0, []
    for _ in range(n):
        t += rng.expovariate(rate)
        out.append((t, rng.choices(FUNCTIONS, weights)[0]))
    return out


def run(workdir: Path, redis_url: str, name: str, cold_wait_s: float, plan: list[tuple[float, str]]) -> dict[str, Any]:
    functions = workdir / f"functions-{name}"
    functions.mkdir()
    shutil.copy(BENCH / "warm_models_functions.py", functions / "warm_models_functions.py")
    worker = {"virtual_gpus": 2, "warm_functions": 2, "cold_wait_s": cold_wait_s, "task_events": False}
    config = {
        "redis": {"url": redis_url, "key_prefix": f"warm-{name}"},
        "worker": worker,
        "defaults": {"on_success": "memory:///ok", "on_failure": "memory:///failed", "dead_letter": "memory:///dlq"},
        "logging": {"level": "warning", "format": "json"},
        "functions": [str(functions)],
        "triggers": [],
    }
    path = workdir / f"fleet-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUFLEET_")}
    env |= {"WARM_REDIS_URL": redis_url, "WARM_RUN": name}
    cp = ControlPlane(load_fleet(path, env={}))
    log = open(workdir / f"worker-{name}.log", "ab")  # noqa: SIM115 - the child writes to it
    proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "worker", "--config", str(path)], env=env,
                            stdout=log, stderr=log, process_group=0)  # fmt: skip
    client = cp.registry.client
    try:
        deadline = time.monotonic() + 120
        while int(client.get(f"warm:{name}:loads") or 0) < 4:  # each worker loads its first two at boot
            if time.monotonic() > deadline:
                raise RuntimeError(f"{name}: the workers did not boot; see {workdir}")
            time.sleep(0.2)
        start, ids = time.monotonic(), []
        for at, fn in plan:
            time.sleep(max(0.0, start + at - time.monotonic()))
            ids.append(cp.invoke(fn, {}).id)
        while not all(cp.status(i)["state"] in TERMINAL for i in ids):
            time.sleep(0.5)
        views = [cp.status(i) for i in ids]
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(60)
    latencies = [_seconds(v["finished_at"]) - _seconds(v["created_at"]) for v in views]
    return {
        "cold": int(client.get(f"warm:{name}:loads") or 0) - 4,
        "by": {k.decode(): int(v) for k, v in client.hgetall(f"warm:{name}:loads_by").items()},
        "failed": sum(v["state"] != "SUCCEEDED" for v in views),
        "p50": statistics.median(latencies),
        "p95": sorted(latencies)[int(0.95 * len(latencies))],
        "setup": sum(v["usage"]["setup_seconds"] or 0 for v in views),
    }


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=200)
    parser.add_argument("--rate", type=float, default=4.0, help="tasks a second (default 4)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--cold-wait", default="5", help="cold_wait_s of the affinity runs, comma-separated")
    args = parser.parse_args()
    waits = [float(w) for w in args.cold_wait.split(",")]
    plan = arrivals(args.tasks, args.rate, args.seed)
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-warm-"))
    services = LocalServices(workdir, kafka=False).start()
    try:
        runs = [(f"affinity, cold_wait_s {w:g}", w) for w in waits] + [("without affinity", 0.0)]
        results = {name: run(workdir, services.redis_url, f"r{i}", wait, plan) for i, (name, wait) in enumerate(runs)}
    finally:
        services.stop()
    base = results["without affinity"]
    print(f"{args.tasks} tasks at {args.rate:g}/s over 8 functions (Zipf 1.1), 2 s setup, 0.1 s each; 2 virtual GPUs "
          f"keeping 2 functions loaded each; seed {args.seed}.\n")  # fmt: skip
    print("| run | cold starts | vs without affinity | setup seconds paid | latency p50 (s) | p95 (s) | failed | "
          "loads of f0 .. f7, boot's too |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, r in results.items():
        ratio = f"{r['cold'] / base['cold']:.2f}x" if base["cold"] else "-"
        print(
            f"| {name} | {r['cold']} | {ratio} | {r['setup']:.1f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['failed']} | "
            f"{' '.join(str(r['by'].get(f, 0)) for f in FUNCTIONS)} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
