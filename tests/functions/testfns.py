"""Functions the test suite serves. They record what happened in Redis (TEST_REDIS_URL) so tests can count runs."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import redis
from pydantic import BaseModel

from gpufleet import Batch, BatchContext, Context, Gpu, ObjectEvent, function, job
from gpufleet.dev.fakenvml import FakeGpus
from gpufleet.functions import LATEST


def _redis() -> redis.Redis:
    return redis.Redis.from_url(os.environ["TEST_REDIS_URL"])


@function(name="echo", max_attempts=3, backoff_s=0.05)
def echo(event: Any, ctx: Context) -> dict[str, Any]:
    _redis().incr(f"runs:{ctx.task_id}")
    ctx.progress(1.0, "echoed")
    if isinstance(event, dict) and "print" in event:
        print(event["print"])  # as a handler may: it must become a log line, not loose text on stdout
    return {"echo": event, "attempt": ctx.attempt}


@function(name="always_fail", max_attempts=3, backoff_s=0.05, backoff_max_s=0.2)
def always_fail(event: Any, ctx: Context) -> None:
    _redis().incr(f"runs:{ctx.task_id}")
    raise ValueError(f"boom on attempt {ctx.attempt}")


@function(name="slow", max_attempts=3, backoff_s=0.05)
def slow(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Sleeps ``seconds``; the time it took, as it measured it, is ``took:<task id>``."""
    began = time.monotonic()
    r = _redis()
    r.pipeline(transaction=False).incr(f"runs:{ctx.task_id}").set(f"pid:{ctx.task_id}", os.getpid()).execute()
    end = began + float(event.get("seconds", 3))
    while time.monotonic() < end:
        time.sleep(min(0.05, max(0.0, end - time.monotonic())))
    r.set(f"took:{ctx.task_id}", time.monotonic() - began)
    return {"slept": event.get("seconds", 3), "attempt": ctx.attempt}


class Typed(BaseModel):
    n: int


@function(name="typed", payload=Typed)
def typed(event: Typed, ctx: Context) -> dict[str, int]:
    return {"square": event.n * event.n}


@function(name="hang", timeout_s=1, max_attempts=1)
def hang(event: dict[str, Any], ctx: Context) -> None:
    """Sleeps past its time limit; with ``stubborn`` it swallows the soft limit, so it must be killed."""
    _redis().incr(f"runs:{ctx.task_id}")
    end = time.monotonic() + 30
    while time.monotonic() < end:
        try:
            time.sleep(0.05)
        except BaseException:
            if not event.get("stubborn"):
                raise


@function(name="coop", max_attempts=1)
def coop(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Reports progress and returns as soon as it is cancelled (or after ``seconds``)."""
    r = _redis()
    r.incr(f"runs:{ctx.task_id}")
    r.set(f"pid:{ctx.task_id}", os.getpid())
    end = time.monotonic() + float(event.get("seconds", 30))
    ctx.progress(0.5, "half way")
    while time.monotonic() < end:
        if ctx.cancelled:
            return {"stopped": "cancelled"}
        time.sleep(0.05)
    return {"stopped": "done"}


@function(name="ignores_cancel", timeout_s=120, max_attempts=3)
def ignores_cancel(event: dict[str, Any], ctx: Context) -> None:
    """Never looks at ``ctx.cancelled``: only killing its process stops it."""
    r = _redis()
    r.incr(f"runs:{ctx.task_id}")
    r.set(f"pid:{ctx.task_id}", os.getpid())
    time.sleep(float(event.get("seconds", 60)))


@function(name="expiring", max_event_age_s=1.0)
def expiring(event: Any, ctx: Context) -> None:
    _redis().incr(f"runs:{ctx.task_id}")


@function(name="objinfo", max_attempts=2, backoff_s=0.2, payload=ObjectEvent)
def objinfo(event: ObjectEvent, ctx: Context) -> dict[str, Any]:
    """Downloads the object of its event, hashes it and uploads a small report next to the outputs."""
    r = _redis()
    r.incr(f"runs:{ctx.task_id}")
    path = ctx.download()
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    report = ctx.scratch / "report.json"
    report.write_text(json.dumps({"key": event.key, "sha256": digest}))
    uploaded = ctx.upload(report)
    r.rpush(f"scratch:{ctx.task_id}", str(ctx.scratch))
    return {"key": event.key, "size": path.stat().st_size, "sha256": digest, "content_type": event.content_type,
            "inside_scratch": ctx.scratch.resolve() in path.resolve().parents, "report": uploaded,
            "event_type": event.event_type}  # fmt: skip


@function(name="unstorable", max_attempts=3, backoff_s=0.05)
def unstorable(event: Any, ctx: Context) -> Any:
    """Returns something JSON cannot hold: the same at every attempt, so it must fail at once."""
    _redis().incr(f"runs:{ctx.task_id}")
    return {"a set": {1, 2}}


@function(name="needs_h100", gpu=Gpu(model="H100"), max_event_age_s=10.0)  # outlives a CLI call on a busy machine
def needs_h100(event: Any, ctx: Context) -> None:
    """Asks for a GPU model the test fleet (virtual GPUs) does not have: no worker consumes its queue."""
    _redis().incr(f"runs:{ctx.task_id}")


@function(name="sized", gpu_memory_gb=40)
def sized(event: Any, ctx: Context) -> dict[str, Any]:
    """Needs 40 GiB of GPU memory (any GPU of a virtual fleet may run it): says where it ran and what its GPU had;
    sleeps ``seconds`` first."""
    _redis().incr(f"runs:{ctx.task_id}")
    memory = ctx.gpu_memory
    time.sleep(float(event.get("seconds", 0)))
    return {"worker": ctx.worker, "total_mb": memory and memory.total_mb, "room_mb": memory and memory.room_mb}


@function(name="huge", gpu=Gpu(memory_gb=100))
def huge(event: Any, ctx: Context) -> None:
    """Needs more GPU memory than the test fleets' fake GPUs have."""
    _redis().incr(f"runs:{ctx.task_id}")


@function(name="oomy", max_attempts=1, oom_retries=2)
def oomy(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Runs out of GPU memory (torch's own OutOfMemoryError) on its first ``times`` runs, and on a GPU with less room
    than ``below_mb``; ``broken``: a CUDA error that breaks the context on its first that many runs instead. With
    ``hold_mb`` it holds that much of its fake GPU first (NVML shows it as this process's). Each run is listed under
    ``oomy:<task id>`` as "worker pid"."""
    r = _redis()
    n = r.incr(f"runs:{ctx.task_id}")
    r.rpush(f"oomy:{ctx.task_id}", f"{ctx.worker} {os.getpid()}")
    if event.get("hold_mb"):
        index = int(ctx.worker.split("@")[0].removeprefix("gpu"))  # gpu<i>@host: the fake's GPU i
        FakeGpus(Path(os.environ["GPUFLEET_WORKER__FAKE_NVML"])).hold(index, event["hold_mb"], os.getpid())
    if n <= event.get("broken", 0):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")
    memory = ctx.gpu_memory
    if n <= event.get("times", 0) or (memory is not None and memory.room_mb < event.get("below_mb", 0)):
        import torch  # in the handler: the other test functions' workers need not load it

        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    return {"worker": ctx.worker, "runs": n}


oomy_pools = function(name="oomy-pools", gpu=Gpu(pools=("eu", "us")), max_attempts=1)(oomy.handler)  # eu first


@function(name="oomy-batch", max_attempts=1, batch=Batch(max_size=8, max_wait_ms=50))
def oomy_batch(events: list[dict[str, Any]], ctx: BatchContext) -> list[Any]:
    """Runs out of GPU memory (as CuPy says it) in a call of more than ``fits`` events (the first event's); each call
    is listed under ``batch:<tag>``."""
    _redis().rpush(f"batch:{events[0].get('tag')}", json.dumps([e.get("n") for e in events]))
    if len(events) > events[0].get("fits", 2):
        raise RuntimeError("cudaErrorMemoryAllocation: out of memory allocating 1073741824 bytes")
    return [{"n": e.get("n"), "size": len(events)} for e in events]


@function(name="chaos", max_attempts=10, backoff_s=0.05, backoff_max_s=0.5)
def chaos(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Records every start (pid and time) so the chaos run can tell a re-run a kill explains from one it does not."""
    _redis().rpush(f"chaos:runs:{ctx.task_id}", f"{os.getpid()} {time.time()}")
    time.sleep(float(event.get("seconds", 0.1)))
    return {"i": event.get("i"), "attempt": ctx.attempt}


@function(name="chaos-batch", max_attempts=10, backoff_s=0.05, backoff_max_s=0.5,
          batch=Batch(max_size=8, max_wait_ms=20))  # fmt: skip
def chaos_batch(events: list[dict[str, Any]], ctx: BatchContext) -> list[dict[str, Any]]:
    """``chaos``, batched: every event's start is recorded as ``chaos`` records it, and each gets its own result."""
    pipe, now = _redis().pipeline(transaction=False), time.time()
    for item in ctx.items:
        pipe.rpush(f"chaos:runs:{item.task_id}", f"{os.getpid()} {now} {len(events)}")
    pipe.execute()
    time.sleep(max(float(e.get("seconds", 0.1)) for e in events))
    return [{"i": e.get("i"), "attempt": item.attempt} for e, item in zip(events, ctx.items, strict=True)]


@function(
    name="batched",
    version="7",
    max_attempts=2,
    backoff_s=0.05,
    max_event_age_s=30,
    batch=Batch(max_size=8, max_wait_ms=50),
)
def batched(events: list[dict[str, Any]], ctx: BatchContext) -> list[Any]:
    """One call per batch, recorded as the list of its events' ``n`` under ``batch:<tag>``. Per event ``mode``:
    ``fail`` returns an exception in its place, ``poison`` makes the whole call raise, ``sleep`` sleeps that long
    (the longest of the batch) first, ``pid`` records the pool process."""
    r = _redis()
    r.rpush(f"batch:{events[0].get('tag')}", json.dumps([e.get("n") for e in events]))
    for item in ctx.items:
        r.incr(f"runs:{item.task_id}")
        r.set(f"pid:{item.task_id}", os.getpid())
    for n, item in enumerate(ctx.items):
        item.progress((n + 1) / len(events), f"event {n + 1} of {len(events)}")  # each its own
    time.sleep(max(float(e.get("sleep", 0)) for e in events))
    if any(e.get("mode") == "poison" for e in events):
        raise RuntimeError("a poison event sank the whole call")
    return [ValueError(f"event {e.get('n')} fails alone") if e.get("mode") == "fail"
            else {"n": e.get("n"), "attempt": item.attempt, "size": len(events)}
            for e, item in zip(events, ctx.items, strict=True)]  # fmt: skip


@function(name="crowd", timeout_s=1.5, max_attempts=3, backoff_s=0.05, batch=Batch(max_size=8, max_wait_ms=50))
def crowd(events: list[dict[str, Any]], ctx: BatchContext) -> list[Any]:
    """A batch function with a short time limit (1.5 s), recorded as ``batched`` is. Per event ``mode``: ``hang``
    sleeps past it (the soft limit stops the call), ``stuck`` sleeps with SIGALRM blocked (only the hard limit stops
    it: the process is killed), ``crash`` kills its own process (as an out-of-memory kill or a CUDA crash would),
    ``short`` returns one result too few."""
    r = _redis()
    r.rpush(f"batch:{events[0].get('tag')}", json.dumps([e.get("n") for e in events]))
    for item in ctx.items:
        r.incr(f"runs:{item.task_id}")
    modes = {e.get("mode") for e in events}
    if "crash" in modes:
        os.kill(os.getpid(), signal.SIGKILL)
    if "stuck" in modes:
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGALRM})
        time.sleep(30)
    if "hang" in modes:
        time.sleep(30)
    for n, item in enumerate(ctx.items):
        item.progress((n + 1) / len(events), f"event {n + 1} of {len(events)}")
    results = [{"n": e.get("n"), "attempt": item.attempt, "size": len(events)}
               for e, item in zip(events, ctx.items, strict=True)]  # fmt: skip
    return results[1:] if "short" in modes else results  # short: one result too few, a bug in the handler


@function(name="spill", gpu=Gpu(pools=("eu", "us"), max_queue_wait_s=1.5), max_attempts=2,
          version=os.environ.get("SPILL_AS", LATEST))  # fmt: skip
def spill(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """Prefers pool eu and overflows to us once eu's estimated wait passes 1.5 s; the version is the host's SPILL_AS
    (tests/integration/test_overflow.py)."""
    _redis().incr(f"runs:{ctx.task_id}")
    time.sleep(float(event.get("seconds", 0.3)))
    return {"worker": ctx.worker}


@function(name="warmup", version="3", when_inactive="refuse")
def warmup(event: Any, ctx: Context) -> dict[str, Any]:
    """Its setup() fails where the worker has WARMUP_FAIL set, and takes WARMUP_S seconds
    (tests/integration/test_versions.py)."""
    return {"state": ctx.state}


@warmup.setup
def load_warmup_model() -> str:
    broken = os.environ.get("WARMUP_FAIL")  # until the test fixes it: fixed:<its value> in Redis
    if broken and not _redis().get(f"fixed:{broken}"):
        raise RuntimeError("no model file at /models/warmup.bin")
    time.sleep(float(os.environ.get("WARMUP_S", "0")))
    return "warm"


@function(name="versioned", version=os.environ.get("VERSIONED_AS", "1"))
def versioned(event: Any, ctx: Context) -> dict[str, Any]:
    """The version is the host's VERSIONED_AS: hosts of a test fleet can run two versions
    (tests/integration/test_versions.py)."""
    _redis().incr(f"runs:{ctx.task_id}")
    return {"ran": os.environ.get("VERSIONED_AS", "1")}


@function(name="tile", max_attempts=3, backoff_s=0.2, timeout_s=60)
def tile(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """A shard of ``tiles`` (tests/integration/test_jobs.py): fails its first ``fail`` attempts, or every attempt while
    its ``broken`` flag is not fixed in Redis; sleeps ``seconds`` (checking cancel, unless ``deaf``), then returns its
    value."""
    r = _redis()
    r.incr(f"runs:{ctx.task_id}")
    if ctx.attempt <= event.get("fail", 0):
        raise RuntimeError(f"tile {event['i']} failed on attempt {ctx.attempt}")
    if event.get("broken") and not r.get(f"fixed:{event['broken']}"):
        raise ValueError(f"tile {event['i']} cannot be processed")
    if event.get("deaf"):  # never looks at ctx.cancelled: only killing its process stops it
        time.sleep(event.get("seconds", 0.1))
    until = time.monotonic() + event.get("seconds", 0.1)
    while time.monotonic() < until and not ctx.cancelled:
        time.sleep(0.05)
    if event.get("huge"):  # a result its job's merge should not have to hold
        return {"i": event["i"], "pixels": "x" * 70_000}
    return {"i": event["i"], "value": event["i"] * 10}


@job(name="tiles", shard=tile, max_shards=40, max_attempts=2, backoff_s=0.2)
def tiles(event: dict[str, Any], ctx: Context) -> Any:
    """Splits into ``n`` shards (``shard`` settings per index: fail, broken, seconds); ``split`` overrides what it
    returns (a bad split), and ``blob`` makes one shard event of that many bytes. Split and merge count their runs
    and sleep ``split_s`` and ``merge_s``."""
    _redis().incr(f"splits:{ctx.task_id}")
    time.sleep(event.get("split_s", 0))
    if "split" in event:
        return event["split"]
    if "blob" in event:  # a shard event too big to pass inline
        return [{"i": 0, "blob": "x" * event["blob"]}]
    per = event.get("shard", {})
    return [{"i": i, "seconds": event.get("seconds", 0.1), **per.get(str(i), {})} for i in range(event["n"])]


@tiles.merge
def merge_tiles(event: dict[str, Any], results: list[dict[str, Any]], ctx: Context) -> dict[str, Any]:
    _redis().incr(f"merges:{ctx.task_id}")
    time.sleep(event.get("merge_s", 0))
    return {"n": len(results), "values": [r["value"] for r in results]}


@job(name="bigsplit", shard=tile, max_shards=1000)
def bigsplit(event: dict[str, Any], ctx: Context) -> list[dict[str, Any]]:
    """``n`` shard events of ``size`` bytes each: a split too large to write to Redis at once."""
    return [{"i": i, "blob": "x" * event["size"]} for i in range(event["n"])]


@bigsplit.merge
def merge_bigsplit(event: dict[str, Any], results: list[dict[str, Any]], ctx: Context) -> int:
    return len(results)


@job(name="tiles_logged", shard=tile, shard_records=True)
def tiles_logged(event: dict[str, Any], ctx: Context) -> list[dict[str, Any]]:
    """As ``tiles``, and each shard sends its own record too."""
    return [{"i": i} for i in range(event["n"])]


@tiles_logged.merge
def merge_logged(event: dict[str, Any], results: list[dict[str, Any]], ctx: Context) -> int:
    return sum(r["value"] for r in results)


@job(name="objtiles", shard=tile, payload=ObjectEvent)
def objtiles(event: ObjectEvent, ctx: Context) -> list[dict[str, Any]]:
    """A job from a bucket event: one shard per line of the object (tests/integration/test_jobs.py)."""
    return [{"i": i} for i, _ in enumerate(ctx.read(event.uri).decode().splitlines())]


@objtiles.merge
def merge_objtiles(event: ObjectEvent, results: list[dict[str, Any]], ctx: Context) -> dict[str, Any]:
    summary = ctx.scratch / "summary.txt"
    summary.write_text(" ".join(str(r["value"]) for r in results))
    return {"key": event.key, "values": [r["value"] for r in results], "summary": ctx.upload(summary)}


@function(name="steps", max_attempts=3)
def steps(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """``steps`` steps, each saved with ctx.checkpoint; a later attempt resumes from the last saved. With ``crash_at``,
    the first attempt's process dies (SIGKILL) right after saving that step; with ``preempt_at``, it writes the
    preemption notice file (``$PREEMPT_NOTICE``) there and waits to be preempted. Each run lists its first step under
    ``starts:<task id>``."""
    saved = ctx.resume_from or {"step": 0, "total": 0}
    _redis().rpush(f"starts:{ctx.task_id}", saved["step"])
    step, total = saved["step"], saved["total"]
    while step < event.get("steps", 60):
        step += 1
        total += step * step
        ctx.checkpoint({"step": step, "total": total, "pad": "x" * event.get("pad", 0)})
        if step == event.get("crash_at") and ctx.attempt == 1:
            os.kill(os.getpid(), signal.SIGKILL)
        if step == event.get("preempt_at") and ctx.attempt == 1:
            Path(os.environ["PREEMPT_NOTICE"]).touch()
            time.sleep(60)  # the notice arrives as TaskPreempted, raised in here
        time.sleep(event.get("pause_s", 0.005))
    return {"steps": step, "total": total}


@steps.on_preempt
def _steps_preempted(ctx: Context) -> None:
    _redis().incr(f"preempted:{ctx.task_id}")  # its state is saved at each step already
