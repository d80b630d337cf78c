"""gpufleet destinations benchmark: does one bad destination hold back the others?

    python bench/destinations.py                   # each phase 60 s, about 4 minutes
    python bench/destinations.py --phase-s 600     # one destination down for 10 minutes

Starts Redis (``LocalServices``), three webhook receivers (A, B, C: real HTTP servers in this process) and a
``gpufleet dispatcher`` process with the shipped dispatcher settings. Records are written to the callback stream as
workers write them, at a steady rate, one for each receiver in turn; each carries the time it was written, and each
receiver notes when it arrived. Phases, each ``--phase-s`` long:

1. all healthy: the baseline;
2. C down (its port refuses connections);
3. C answers 503 after 2 s, every time;
4. C back: how long until every record it missed has arrived, and how many are missing or parked.

The figure is the p99 delivery delay of A and B in phases 2 and 3, as a ratio to phase 1 (the target is <= 1.5x).
The report goes to stdout and to ``bench/results/destinations.md``.
"""

from __future__ import annotations

import argparse
import http.server
import os
import secrets
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, ClassVar

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "destinations.md"

import orjson  # noqa: E402
import redis  # noqa: E402
import yaml  # noqa: E402

from gpufleet.dev.local import LocalServices  # noqa: E402
from gpufleet.dev.services import free_port, stop  # noqa: E402


class Receiver(http.server.BaseHTTPRequestHandler):
    arrivals: ClassVar[dict[str, list[tuple[str, float, float]]]] = {}  # name -> (key, written, arrived)
    slow: ClassVar[set[str]] = set()
    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        name = self.path.strip("/")
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if name in self.slow:
            time.sleep(2)
            self.send_response(503)
        else:
            written = orjson.loads(body)["written"]
            self.arrivals.setdefault(name, []).append((self.headers["X-Gpufleet-Task-Id"], written, time.time()))
            self.send_response(204)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


class Endpoint:
    def __init__(self, name: str) -> None:
        self.name, self.port, self.server = name, free_port(), None
        self.up()

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/{self.name}#secret_env=BENCH_HOOK_SECRET"

    def up(self) -> None:
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), Receiver)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def down(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None


def write(client: redis.Redis, prefix: str, endpoints: list[Endpoint], seconds: float, rate: float, tag: str,
          ) -> int:  # fmt: skip
    """Records for each endpoint in turn at ``rate`` per second in all; returns how many each got."""
    n = int(seconds * rate)
    start = time.monotonic()
    for i in range(n):
        ep = endpoints[i % len(endpoints)]
        value = orjson.dumps({"written": time.time(), "i": i})
        client.xadd(f"{prefix}:callbacks", {"dest": ep.url(), "key": f"{tag}-{i}", "value": value,
                                            "condition": "Success", "function": "bench"})  # fmt: skip
        time.sleep(max(0.0, start + (i + 1) / rate - time.monotonic()))
    return n // len(endpoints)


def missed() -> set[str]:
    """C's records written while it was down or failing that have arrived."""
    return {key for key, _, _ in Receiver.arrivals.get("c", []) if key.startswith(("cdown", "cslow"))}


def p(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] * 1000 if values else float("nan")


def delays(name: str, tag: str) -> list[float]:
    return [arrived - written for key, written, arrived in Receiver.arrivals.get(name, []) if key.startswith(tag)]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--phase-s", type=float, default=60.0)
    ap.add_argument("--rate", type=float, default=60.0, help="records per second, all destinations together")
    args = ap.parse_args()
    os.environ["BENCH_HOOK_SECRET"] = secrets.token_hex(24)
    a, b, c = Endpoint("a"), Endpoint("b"), Endpoint("c")
    with (
        tempfile.TemporaryDirectory(prefix="gpufleet-bench-dest-") as tmp,
        LocalServices(Path(tmp), kafka=False) as svc,
    ):
        prefix = "benchdest"
        config = Path(tmp) / "fleet.yaml"
        (Path(tmp) / "triggers").mkdir()
        config.write_text(yaml.safe_dump({"redis": {"url": svc.redis_url, "key_prefix": prefix},
                                          "functions": [], "triggers": [str(Path(tmp) / "triggers")],
                                          "logging": {"format": "json"}}))  # fmt: skip
        client = redis.Redis.from_url(svc.redis_url)
        log = open(Path(tmp) / "dispatcher.log", "wb")  # noqa: SIM115 - the child writes to it
        proc = subprocess.Popen([sys.executable, "-m", "gpufleet", "dispatcher", "--config", str(config)],
                                stdout=log, stderr=log)  # fmt: skip
        rows: list[tuple[str, float, float]] = []
        try:
            # Untimed: the dispatcher's flows start (a thread, a lease and a connection each) on their first record.
            write(client, prefix, [a, b, c], 3, args.rate, "warmup")
            time.sleep(2)
            print("phase 1: all healthy", file=sys.stderr)
            write(client, prefix, [a, b, c], args.phase_s, args.rate, "healthy")
            time.sleep(2)
            base = delays("a", "healthy") + delays("b", "healthy")
            rows.append(("all healthy (baseline)", p(base, 0.5), p(base, 0.99)))
            print("phase 2: C down", file=sys.stderr)
            c.down()
            per_c = write(client, prefix, [a, b, c], args.phase_s, args.rate, "cdown")
            time.sleep(2)
            got = delays("a", "cdown") + delays("b", "cdown")
            rows.append(("C down", p(got, 0.5), p(got, 0.99)))
            print("phase 3: C answers 503 after 2 s", file=sys.stderr)
            Receiver.slow.add("c")
            c.up()
            per_c += write(client, prefix, [a, b, c], args.phase_s, args.rate, "cslow")
            time.sleep(2)
            got = delays("a", "cslow") + delays("b", "cslow")
            rows.append(("C answers 503 after 2 s", p(got, 0.5), p(got, 0.99)))
            print("phase 4: C back", file=sys.stderr)
            Receiver.slow.discard("c")
            back = time.monotonic()
            while len(missed()) < per_c and time.monotonic() - back < max(120.0, args.phase_s):
                time.sleep(0.5)
            caught_up = time.monotonic() - back
            parked = int(client.xlen(f"{prefix}:parked"))
        finally:
            stop(proc)
            log.close()
            for ep in (a, b, c):
                ep.down()
    base_p99 = rows[0][2]
    lines = ["| phase | A and B delay p50 (ms) | p99 (ms) | p99 ratio to healthy |", "|---|---|---|---|"]
    lines += [f"| {name} | {p50:.1f} | {p99:.1f} | {p99 / base_p99:.2f}x |" for name, p50, p99 in rows]
    lines += ["", f"C's {per_c} records written while it was down or failing: {len(missed())} arrived "
              f"{caught_up:.1f} s after it came back, {per_c - len(missed())} missing, {parked} parked. "
              f"{args.rate:g} records/s for {args.phase_s:g} s per phase; shipped dispatcher settings."]  # fmt: skip
    report = "\n".join(lines)
    print(report)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(report + "\n")
    return 0 if per_c == len(missed()) and parked == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
