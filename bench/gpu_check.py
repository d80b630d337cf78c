"""``make gpu-check``: gpufleet on this machine's real NVIDIA GPUs, in one run of a few minutes, as one table.

    python bench/gpu_check.py [--rehearse] [--tasks 40]

1. the NVML inventory: each GPU's model, memory (free, and held by other processes), utilisation, health;
2. a worker per GPU (``gpufleet worker``), its pinning checked from inside the handler: torch's device name and UUID
   against NVML's for that worker;
3. a matmul on the device: its TFLOP/s, and its answer against the CPU's;
4. an induced out-of-memory (a real CUDA OOM), recovered: the task's record and what the next run could allocate;
5. ``gpu_seconds`` against the handlers' own time, on 100 ms GPU tasks;
6. the duty cycle on the same tasks against a raw Celery worker on GPU 0, in the same run;
7. batching throughput on a small real model (an MLP), batched against one event per call;
8. a warm-model switch on workers that keep one model loaded: the second model's cold start (4 GiB, host to GPU) and
   the GPU memory held after it (the first one unloaded);
9. with two GPUs or more, a task of two GPUs: what its handler sees (torch's devices against NVML's).

Without a GPU it says so in one line and exits 0. ``--rehearse`` runs it all on a fake NVML GPU and torch's CPU
device instead (the CI does, so the script is ready for the day a GPU is at hand).
"""

from __future__ import annotations

import argparse
import itertools
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import structlog
import yaml

from gpufleet.config import load_fleet
from gpufleet.control.plane import ControlPlane
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.dev.local import LocalServices
from gpufleet.worker.gpus import Sampler, discover, load_nvml

BENCH = Path(__file__).resolve().parent
TERMINAL = {"SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED", "EXPIRED"}
Row = tuple[str, str, str]  # check, result, detail


class CheckError(Exception):
    pass


def wait(cond: Callable[[], Any], timeout_s: float, what: str) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(0.1)
    raise CheckError(f"timed out after {timeout_s:g} s waiting for {what}")


def finished(cp: ControlPlane, ids: list[str], timeout_s: float) -> list[dict[str, Any]]:
    wait(lambda: all(cp.status(i)["state"] in TERMINAL for i in ids), timeout_s, f"{len(ids)} tasks")
    return [cp.status(i) for i in ids]


def write_fleet(
    workdir: Path, redis_url: str, fake: Path | None, name: str = "fleet", files: tuple[str, ...] = ("functions",),
    **worker_settings: Any,
) -> Path:  # fmt: skip
    """A fleet of this machine's GPUs (or the fake NVML's) serving ``bench/gpu_check_<file>.py`` for each file."""
    functions = workdir / f"functions-{name}"
    functions.mkdir()
    for file in files:
        shutil.copy(BENCH / f"gpu_check_{file}.py", functions / f"gpu_check_{file}.py")
    worker: dict[str, Any] = {"virtual_gpus": 0, "lease_s": 30, "task_events": False, **worker_settings}
    if fake is not None:
        worker["fake_nvml"] = str(fake)
    config = {
        "redis": {"url": redis_url, "key_prefix": f"gpucheck-{name}"},
        "worker": worker,
        "defaults": {"on_success": "memory:///ok", "on_failure": "memory:///failed", "dead_letter": "memory:///dlq"},
        "logging": {"level": "warning", "format": "json"},
        "functions": [str(functions)],
        "triggers": [],
    }
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def inventory_rows(nvml: Any) -> list[Row]:
    gpus = discover(nvml)
    sampler = Sampler(gpus, nvml)
    rows = []
    for gpu in gpus:
        f = sampler.sample(gpu)
        health = "ok" if f["memory_used_mb"] is not None else "not answering (lost?)"
        detail = (
            f"{f['memory_total_mb']} MiB, {f['memory_free_mb']} free, {f['memory_others_mb']} held by others, "
            f"{f['utilization_pct']} % busy, {gpu.uuid}"
        )
        where = f"NVML: GPU {gpu.index}" + (f", MIG instance {gpu.slice}" if gpu.mig else "")
        rows.append((where, f"{gpu.name}: {health}", detail))
    sampler.close()
    return [*rows, mig_row(gpus)]


def mig_row(gpus: list[Any]) -> Row:
    """The MIG mode found: gpufleet runs a worker per instance, and never changes the layout."""
    instances: dict[int, list[str]] = {}
    for gpu in gpus:
        if gpu.mig:
            instances.setdefault(gpu.index, []).append(gpu.mig)
    if not instances:
        return ("MIG mode", "off", "every GPU whole: a worker each")
    found = "; ".join(f"GPU {i}: {len(p)} instances ({', '.join(sorted(set(p)))})" for i, p in instances.items())
    return ("MIG mode", "on", f"{found}; a worker per instance, pinned by its MIG UUID")


def spans(client: Any, side: str) -> dict[str, list[tuple[float, float]]]:
    """Worker -> its handler spans, in order."""
    out: dict[str, list[tuple[float, float]]] = {}
    for raw in client.lrange(f"gpucheck:spans:{side}", 0, -1):
        start, end, worker = raw.decode().split(",")
        out.setdefault(worker, []).append((float(start), float(end)))
    return {w: sorted(s) for w, s in out.items()}


def duty(worker_spans: list[tuple[float, float]]) -> tuple[float, float]:
    """The share of wall time a handler ran, first start to last end, and the mean gap between two (ms)."""
    busy = sum(end - start for start, end in worker_spans)
    wall = worker_spans[-1][1] - worker_spans[0][0]
    gaps = [b[0] - a[1] for a, b in itertools.pairwise(worker_spans)]
    return busy / wall, 1000 * sum(gaps) / max(1, len(gaps))


class Check:
    def __init__(self, args: argparse.Namespace, workdir: Path, redis_url: str, fake: Path | None) -> None:
        self.args = args
        self.workdir = workdir
        self.redis_url, self.fake = redis_url, fake
        self.config = write_fleet(workdir, redis_url, fake)
        self.env = {**os.environ, "GPU_CHECK_REDIS_URL": redis_url, "PYTHONPATH": str(BENCH)}
        self.env = {k: v for k, v in self.env.items() if not k.startswith("GPUFLEET_")}
        self.cp = ControlPlane(load_fleet(self.config, env={}))
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        log = open(self.workdir / f"{name}.log", "ab")  # noqa: SIM115 - the child writes to it
        proc = subprocess.Popen(argv, env=env or self.env, stdout=log, stderr=log, process_group=0)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, 15)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, 9)
                proc.wait()

    def fleet_up(self, workers: int) -> subprocess.Popen[bytes]:
        proc = self.start("worker", [sys.executable, "-m", "gpufleet", "worker", "--config", str(self.config)])
        ready = self.cp.registry.keys.ready
        wait(lambda: len(self.cp.registry.client.hkeys(ready)) >= workers, 180, f"{workers} GPU workers ready")
        return proc

    def whole_gpus(self, uuids: list[str]) -> list[Row]:
        """A second fleet, whose workers keep one model loaded (``warm_functions: 1``): a switch from one model to
        another, and, with two GPUs or more, a task of two GPUs."""
        gpus = len(uuids)
        if not gpus:  # a function that names no MIG profile or memory runs on whole GPUs only
            return [("warm-model switch", "skipped", "no whole GPU here (every GPU in MIG mode)")]
        files = ("models", "pair") if gpus >= 2 else ("models",)
        self.config = write_fleet(self.workdir, self.redis_url, self.fake, "whole", files, warm_functions=1)
        self.cp = ControlPlane(load_fleet(self.config, env={}))
        # GPU memory ample for the models here: a real load's worth where there is a GPU to load it to.
        self.env["GPU_CHECK_MODEL_MB"] = "64" if self.args.rehearse else "4096"
        fleet = self.fleet_up(gpus + gpus // 2)  # a worker per GPU, and one per aligned pair
        rows = [self.model_switch()]
        rows.append(self.pair(uuids[:2]) if gpus >= 2 else ("task of 2 GPUs", "skipped", "one GPU here"))
        self.stop(fleet)
        return rows

    def model_switch(self) -> Row:
        """model-a is loaded at boot; model-b's task unloads it (teardown) and loads its own: a cold start."""
        [a] = finished(self.cp, [self.cp.invoke("model-a", {}).id], 60)
        [b] = finished(self.cp, [self.cp.invoke("model-b", {}).id], 120)
        if a["state"] != "SUCCEEDED" or b["state"] != "SUCCEEDED":
            return ("warm-model switch", "FAILED", str(a["error"] or b["error"])[:300])
        size, held = int(self.env["GPU_CHECK_MODEL_MB"]), b["result"]["allocated_mb"]
        setup = b["usage"]["setup_seconds"] or 0
        ok = setup > 0 and (held is None or held < 1.5 * size)  # the model it unloaded no longer holds memory
        detail = (
            f"model-b's cold start (setup) {setup:.2f} s for {size} MiB, host to GPU, on {b['result']['worker']}; GPU "
            f"memory allocated after: {held if held is not None else 'n/a (CPU)'} MiB; model-a's task "
            f"{a['usage']['setup_seconds'] or 0:.2f} s (loaded at boot)"
        )
        return ("warm-model switch", "ok" if ok else "FAILED", detail)

    def pair(self, uuids: list[str]) -> Row:
        """The first pair's worker runs it: torch must see those two GPUs, and only those."""
        [view] = finished(self.cp, [self.cp.invoke("pair", {}).id], 120)
        if view["state"] != "SUCCEEDED":
            return ("task of 2 GPUs", "FAILED", str(view["error"])[:300])
        r = view["result"]

        def same(found: list[str]) -> list[str]:
            return sorted(u.lower().removeprefix("gpu-") for u in found)

        ok = len(r["visible"].split(",")) == 2 and (self.args.rehearse or same(r["uuids"]) == same(uuids))
        detail = (
            f"{r['worker']}: CUDA_VISIBLE_DEVICES={r['visible']}, GPUFLEET_GPUS={r['gpus']}; torch sees "
            f"{r['count']} device(s) {r['uuids']}"
        )
        return ("task of 2 GPUs", "ok" if ok else "MISMATCH", detail)

    def pinning(self, inventory: dict[str, dict[str, Any]]) -> list[Row]:
        ids = [self.cp.invoke("pin", {"n": n}).id for n in range(2 * len(inventory))]
        rows, seen = [], set()
        for view in finished(self.cp, ids, 120):
            r = view["result"] or {}
            if view["state"] != "SUCCEEDED":
                rows.append(("pinning", "FAILED", str(view["error"])[:300]))
                continue
            if r["worker"] in seen:
                continue
            seen.add(r["worker"])
            nvml = inventory.get(r["worker"], {})
            if not r.get("cuda"):
                rows.append(
                    (
                        f"pinning: {r['worker']}",
                        "no CUDA (rehearsal)" if self.args.rehearse else "FAILED: torch sees no CUDA in the handler",
                        f"CUDA_VISIBLE_DEVICES={r['visible']}",
                    )
                )
                continue
            same = r["torch_uuid"].lower().removeprefix("gpu-") == str(nvml.get("uuid", "")).lower().removeprefix(
                "gpu-"
            )
            verdict = "ok" if same and r["count"] == 1 else "MISMATCH"
            rows.append(
                (
                    f"pinning: {r['worker']}",
                    verdict,
                    f"torch sees {r['count']} device(s): {r['torch_name']} "
                    f"{r['torch_uuid']}; NVML: {nvml.get('name')} {nvml.get('uuid')}",
                )
            )
        return rows

    def matmul(self) -> Row:
        [view] = finished(self.cp, [self.cp.invoke("matmul", {"n": 4096, "repeat": 20}).id], 180)
        r = view["result"] or {}
        verdict = "ok" if view["state"] == "SUCCEEDED" and r.get("matches_cpu") else f"FAILED: {view['error']}"
        return (
            "matmul 4096x4096 fp32",
            verdict,
            f"{r.get('tflops')} TFLOP/s on {r.get('device')}, answer = CPU's: {r.get('matches_cpu')}",
        )

    def oom(self) -> Row:
        [view] = finished(self.cp, [self.cp.invoke("oom", {}).id], 180)
        last = view.get("last_error") or {}
        ok = view["state"] == "SUCCEEDED" and view["gpu_retries"] == 1 and last.get("errorType") == "GpuOutOfMemory"
        detail = (
            f"{view['state']} after {view['gpu_retries']} OOM retry, attempts {view['attempts']}; its OOM: "
            f"{last.get('errorMessage', '')[:90]!r}, peak {last.get('peakGpuMemoryMb')} MiB; next run allocated "
            f"{(view['result'] or {}).get('allocated_mb')} MiB"
        )
        return ("induced OOM, recovered", "ok" if ok else "FAILED", detail)

    def busy_tasks(self, n: int) -> tuple[list[Row], dict[str, list[tuple[float, float]]]]:
        ids = [self.cp.invoke("busy", {"ms": 100}).id for _ in range(n)]
        views = finished(self.cp, ids, 60 + n)
        mine = spans(self.cp.registry.client, "gpufleet")
        handler = sum(end - start for s in mine.values() for start, end in s)
        gpu = sum((v["usage"] or {}).get("gpu_seconds", 0) for v in views)
        off = abs(gpu - handler) / handler
        row = (
            "gpu_seconds vs handler time",
            "ok" if off < 0.01 else "OFF",
            f"{gpu:.3f} s recorded, {handler:.3f} s "
            f"the handlers measured ({100 * off:.2f} % apart), {n} tasks of 100 ms",
        )
        return [row], mine

    def raw_duty(self, n: int) -> tuple[float, float]:
        env = {**self.env, "CUDA_VISIBLE_DEVICES": "0"}
        argv = [
            sys.executable,
            "-m",
            "celery",
            "-A",
            "gpu_check_raw",
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--prefetch-multiplier",
            "1",
            "-Q",
            "gpucheck.raw",
            "-O",
            "fair",
            "--without-mingle",
            "--without-gossip",
            "--without-heartbeat",
            "-n",
            "raw@%h",
        ]
        proc = self.start("raw-celery", argv, env)
        sys.path.insert(0, str(BENCH))
        os.environ["GPU_CHECK_REDIS_URL"] = self.env["GPU_CHECK_REDIS_URL"]
        import gpu_check_raw

        gpu_check_raw.app.send_task("gpucheck.busy", args=[100], queue=gpu_check_raw.QUEUE)  # warm-up
        client = self.cp.registry.client
        wait(lambda: client.llen("gpucheck:spans:raw") >= 1, 180, "the raw Celery worker's warm-up task")
        client.delete("gpucheck:spans:raw")
        for _ in range(n):
            gpu_check_raw.app.send_task("gpucheck.busy", args=[100], queue=gpu_check_raw.QUEUE)
        wait(lambda: client.llen("gpucheck:spans:raw") >= n, 60 + n, f"{n} raw Celery tasks")
        self.stop(proc)
        return duty(spans(client, "raw")["raw"])

    def batching(self, n: int) -> Row:
        rates = {}
        for function in ("embed-one", "embed"):
            ids = [self.cp.invoke(function, {"seed": s}).id for s in range(n)]
            views = finished(self.cp, ids, 120 + n / 10)
            if any(v["state"] != "SUCCEEDED" for v in views):
                return ("batching: an MLP", "FAILED", str([v["error"] for v in views if v["error"]][:1]))
            first = min(v["started_at"] for v in views)
            last = max(v["finished_at"] for v in views)
            span = _seconds(last) - _seconds(first)
            rates[function] = n / span
        ratio = rates["embed"] / rates["embed-one"]
        detail = (
            f"{rates['embed']:.0f} events/s batched (max_size 32) against {rates['embed-one']:.0f}/s one per "
            f"call, {n} events each"
        )
        return ("batching: an MLP, 512 -> 1024 -> 1024 -> 256", f"{ratio:.2f}x", detail)


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run(args: argparse.Namespace) -> list[Row]:
    workdir = Path(tempfile.mkdtemp(prefix="gpufleet-gpu-check-"))
    fake: FakeGpus | None = None
    if args.rehearse:
        fake = FakeGpus(workdir / "nvml.json")
        fake.add("NVIDIA H100 80GB HBM3")
    nvml = load_nvml(fake.path if fake else None)
    if nvml is None or not discover(nvml):
        return []
    rows = inventory_rows(nvml)
    services = LocalServices(workdir, kafka=False).start()
    check = Check(args, workdir, services.redis_url, fake.path if fake else None)
    try:
        gpus = len(discover(nvml))
        fleet = check.fleet_up(gpus)
        inventory = wait(lambda: {g["worker"]: g for g in check.cp.gpus() if g["up"]}, 30, "the GPU inventory")
        rows += check.pinning(inventory)
        rows.append(check.matmul())
        rows.append(check.oom())
        busy_rows, mine = check.busy_tasks(args.tasks)
        rows += busy_rows
        rows.append(check.batching(args.batch))
        check.stop(fleet)
        ours = duty(mine[min(mine)])  # the first GPU's worker: the raw one runs on GPU 0 too
        theirs = check.raw_duty(args.tasks)
        rows.append(
            (
                "duty cycle, 100 ms GPU tasks",
                f"{ours[0] / theirs[0]:.3f}x raw Celery",
                f"{100 * ours[0]:.2f} % (gap {ours[1]:.2f} ms) against {100 * theirs[0]:.2f} % "
                f"(gap {theirs[1]:.2f} ms), {args.tasks} tasks each",
            )
        )
        if fake is not None:  # the rehearsal's second GPU: the task of two GPUs runs too
            fake.add("NVIDIA H100 80GB HBM3")
        rows += check.whole_gpus([gpu.uuid for gpu in discover(nvml) if not gpu.mig])
    except CheckError as exc:
        rows.append(("stopped", "FAILED", f"{exc}; logs in {workdir}"))
    finally:
        for proc in check.procs:
            check.stop(proc)
        services.stop()
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rehearse", action="store_true", help="a fake NVML GPU and torch's CPU device")
    parser.add_argument("--tasks", type=int, default=40, help="100 ms tasks per side (default: 40)")
    parser.add_argument("--batch", type=int, default=512, help="events per batching side (default: 512)")
    args = parser.parse_args()
    # Its own lines only: "no NVIDIA driver found" and the like are what the table says.
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    began = time.monotonic()
    rows = run(args)
    if not rows:
        print("gpu-check: no NVIDIA GPU here (NVML found none): nothing to check")
        return 0
    print(f"## gpufleet gpu-check{' (rehearsal: a fake NVML GPU, torch on the CPU)' if args.rehearse else ''}\n")
    print("| check | result | detail |\n|---|---|---|")
    for check, result, detail in rows:
        print(f"| {check} | {result} | {detail} |")
    print(f"\n{time.monotonic() - began:.0f} s in all")
    return 1 if any(r[1].startswith(("FAILED", "MISMATCH", "OFF")) for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
