"""The Prometheus endpoint (``GET /metrics`` on the api role).

Why read the registry at scrape time, rather than prometheus-client's multiprocess mode: the roles are separate
processes, often on separate hosts (GPU workers here, triggers and the API there). Multiprocess mode merges the
files of processes on one host, sharing one directory; it cannot see a worker on another machine, and loses a
counter when its host is replaced. Every figure gpufleet has is in Redis already, or is put there by the role that
knows it (:mod:`gpufleet.registry.snapshot`), so every api replica serves the same, whole-fleet answer, and a scrape
costs a few pipelined round trips to Redis, whatever the number of hosts and functions.

Counters (``_total``) and histograms live in Redis too, so they survive any process restart; they reset only with
Redis itself, which Prometheus's ``rate()`` handles as any counter reset.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from gpufleet.config import Fleet
from gpufleet.registry.keyspace import HISTOGRAM_BOUNDS, US
from gpufleet.registry.snapshot import Histogram, Snapshot, read
from gpufleet.registry.store import Registry
from gpufleet.scheduling.scaling import needs
from gpufleet.scheduling.versions import all_versions

# The text format every Prometheus (2.x and 3.x) reads; every name here is a classic one, so 1.0.0 would add nothing.
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FleetCollector(Collector):
    def __init__(self, fleet: Fleet, registry: Registry) -> None:
        self.fleet = fleet
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        snap = read(self.registry, list(self.fleet.functions))
        yield from _tasks(snap)
        yield from _queues(snap)
        yield from _gpus(snap)
        yield from _delivery(snap)
        s = self.fleet.settings
        doc = "GPU worker hosts needed now, per pool and GPU model: ceil((queued + running) / slots per worker)"
        desired = GaugeMetricFamily("gpufleet_desired_workers", doc, labels=["pool", "model"])
        hosts = GaugeMetricFamily(
            "gpufleet_workers",
            "Worker hosts per pool and GPU model, ready or still starting",
            labels=["pool", "model", "state"],
        )
        for need in needs(snap, s.redis.key_prefix, s.worker.slots_per_worker):
            desired.add_metric([need.pool, need.model], need.desired)
            hosts.add_metric([need.pool, need.model, "ready"], need.ready)
            hosts.add_metric([need.pool, need.model, "starting"], need.starting)
        yield desired
        yield hosts
        yield from _versions(all_versions(self.registry, self.fleet.functions.values()))
        yield _gpu_seconds(self.registry.client.hgetall(self.registry.keys.metric("gpu_time")))  # type: ignore[arg-type]


def _gpu_seconds(counters: dict[bytes, bytes]) -> Metric:
    """GPU time by function, GPU model and pool: every run, at handler time x GPUs held (see registry.tally)."""
    doc = "GPU time the tasks' handlers took (every run, GPUs held x seconds), by function, GPU model and pool"
    family = CounterMetricFamily("gpufleet_gpu_seconds", doc, labels=["function", "model", "pool"])
    for name, value in sorted(counters.items()):
        function, model, pool, part = name.decode().split(US)
        if part == "us":
            family.add_metric([function, model, pool], int(value) / 1e6)
    return family


def _tasks(snap: Snapshot) -> Iterable[Metric]:
    tasks = GaugeMetricFamily(
        "gpufleet_tasks",
        "Tasks per state (finished ones while their records are retained)",
        labels=["function", "state"],
    )
    for (fn, state), n in sorted(snap.counts.items()):
        tasks.add_metric([fn, state], n)
    created = CounterMetricFamily(
        "gpufleet_tasks_created", "Tasks created (duplicates not counted)", labels=["function"]
    )
    for fn, n in sorted(snap.created.items()):
        created.add_metric([fn], n)
    finished = CounterMetricFamily(
        "gpufleet_tasks_finished", "Tasks that reached a final state", labels=["function", "state"]
    )
    for (fn, state), n in sorted(snap.finished.items()):
        finished.add_metric([fn, state], n)
    doc = "Tasks placed in a pool other than their function's first (see gpufleet.scheduling.placement)"
    overflows = CounterMetricFamily("gpufleet_overflows", doc, labels=["function", "from_pool", "to_pool"])
    for (fn, first, pool), n in sorted(snap.overflows.items()):
        overflows.add_metric([fn, first, pool], n)
    return [
        tasks,
        created,
        finished,
        overflows,
        _histogram("gpufleet_task_queue_wait_seconds", "Time from entering its queue to a worker taking it", snap.wait),
        _histogram(
            "gpufleet_task_duration_seconds",
            "Time from a worker taking the task to its attempt ending (retried attempts included)",
            snap.duration,
        ),
        _histogram(
            "gpufleet_cold_start_seconds",
            "setup() runs a task waited for: its function was not loaded where it ran (worker.warm_functions)",
            snap.cold,
        ),
    ]


def _histogram(name: str, doc: str, per_function: dict[str, Histogram]) -> Metric:
    family = HistogramMetricFamily(name, doc, labels=["function"])
    bounds = [*(floatToGoString(b) for b in HISTOGRAM_BOUNDS), "+Inf"]  # type: ignore[no-untyped-call]
    for fn, hist in sorted(per_function.items()):
        cumulative, total = [], 0
        for bound, n in zip(bounds, hist.buckets, strict=True):
            total += n
            cumulative.append((bound, total))
        family.add_metric([fn], cumulative, hist.sum)
    return family


def _queues(snap: Snapshot) -> Iterable[Metric]:
    depth = GaugeMetricFamily("gpufleet_queue_depth", "Tasks waiting in the queue", labels=["queue"])
    oldest = GaugeMetricFamily(
        "gpufleet_queue_oldest_age_seconds", "How long the oldest waiting task has waited", labels=["queue"]
    )
    running = GaugeMetricFamily("gpufleet_queue_running_tasks", "Tasks of the queue running now", labels=["queue"])
    for q in sorted(snap.queues.values(), key=lambda q: q.name):
        depth.add_metric([q.name], q.depth)
        oldest.add_metric([q.name], q.oldest_age_s)
        running.add_metric([q.name], q.running)
    lag = GaugeMetricFamily(
        "gpufleet_trigger_lag_messages",
        "Messages a Kafka trigger has not read yet, per partition (consumer lag)",
        labels=["trigger", "partition"],
    )
    source = GaugeMetricFamily(
        "gpufleet_trigger_source_depth_messages",
        "Messages waiting at a queue trigger's "
        "source: SQS's approximate count (state messages), AMQP's ready ones and those the "
        "trigger holds unacknowledged",
        labels=["trigger", "state"],
    )
    for trigger, report in sorted(snap.trigger_lag.items()):
        for label, n in sorted(report.get("values", {}).items()):
            (lag if report.get("kind") == "partition" else source).add_metric([trigger, label], n)
    return [depth, oldest, running, lag, source]


def _versions(found: dict[str, list[dict[str, Any]]]) -> Iterable[Metric]:
    labels = ["function", "version"]
    queued = GaugeMetricFamily(
        "gpufleet_version_queued_tasks",
        "Tasks queued for one version alone (name:version, or an alias's pick); gpufleet_queue_depth counts them too",
        labels=labels,
    )
    state = GaugeMetricFamily(
        "gpufleet_version_state",
        "1 for the version's state (ACTIVE, DEPLOYING, ERROR or INACTIVE), from the live workers",
        labels=[*labels, "state"],
    )
    workers = GaugeMetricFamily(
        "gpufleet_version_workers", "Live workers that run the version and reported its setup()", labels=labels
    )
    for fn, views in sorted(found.items()):
        for view in views:
            queued.add_metric([fn, view["version"]], view["queued"])
            state.add_metric([fn, view["version"], view["state"]], 1)
            workers.add_metric([fn, view["version"]], view["workers"])
    return [queued, state, workers]


def _gpus(snap: Snapshot) -> Iterable[Metric]:
    labels = ["worker", "host", "model"]
    up = GaugeMetricFamily(
        "gpufleet_worker_up", "1 while the GPU worker process runs and its host reports", labels=labels
    )
    ready = GaugeMetricFamily(
        "gpufleet_worker_ready", "1 once the worker has run setup() and takes tasks", labels=labels
    )
    restarts = CounterMetricFamily(
        "gpufleet_worker_restarts",
        "Times the supervisor restarted the GPU worker process (since the supervisor started)",
        labels=labels,
    )
    running = GaugeMetricFamily(
        "gpufleet_gpu_running_tasks", "Tasks the GPU's worker holds (a batch's events each)", labels=labels
    )
    util = GaugeMetricFamily("gpufleet_gpu_utilization_ratio", "GPU utilisation from NVML, 0 to 1", labels=labels)
    used = GaugeMetricFamily("gpufleet_gpu_memory_used_bytes", "GPU memory in use, from NVML", labels=labels)
    total = GaugeMetricFamily("gpufleet_gpu_memory_total_bytes", "GPU memory, from NVML", labels=labels)
    cordoned = GaugeMetricFamily(
        "gpufleet_gpu_cordoned",
        "1 while the GPU is out of service, with why and by whom",
        labels=[*labels, "by", "reason"],
    )
    for e in snap.gpus:
        key = [e["worker"], e.get("host", ""), e.get("model", "")]
        live = bool(e.get("up")) and not e["stale"]
        if e.get("cordoned"):
            cordoned.add_metric([*key, e["cordoned"].get("by", ""), e["cordoned"].get("reason", "")], 1)
        up.add_metric(key, int(live))
        ready.add_metric(key, int(e["ready"]))
        restarts.add_metric(key, int(e.get("restarts_total", 0)))
        running.add_metric(key, len(e.get("task_ids") or []) if live else 0)
        if e.get("utilization_pct") is not None:
            util.add_metric(key, e["utilization_pct"] / 100)
        if e.get("memory_used_mb") is not None:
            used.add_metric(key, e["memory_used_mb"] * 2**20)
        if e.get("memory_total_mb"):
            total.add_metric(key, e["memory_total_mb"] * 2**20)
    return [up, ready, restarts, running, util, used, total, cordoned, *_dcgm(snap)]


# NVIDIA's DCGM exporter's names and labels, so that its Grafana dashboards read gpufleet's GPUs (worker added).
DCGM = (
    ("DCGM_FI_DEV_GPU_UTIL", "GPU utilization (in %)", "utilization_pct"),
    ("DCGM_FI_DEV_FB_USED", "Framebuffer memory used (in MiB)", "memory_used_mb"),
    ("DCGM_FI_DEV_FB_FREE", "Framebuffer memory free (in MiB)", "memory_free_mb"),
    ("DCGM_FI_DEV_GPU_TEMP", "GPU temperature (in C)", "temperature_c"),
    ("DCGM_FI_DEV_POWER_USAGE", "Power draw (in W)", "power_w"),
    ("DCGM_FI_DEV_CLOCK_THROTTLE_REASONS", "Throttling reasons (NVML's bit mask)", "throttle_reasons"),
    ("DCGM_FI_DEV_XID_ERRORS", "Value of the last XID error encountered", "last_xid"),
)


def _dcgm(snap: Snapshot) -> list[Metric]:
    labels = ["gpu", "UUID", "device", "modelName", "Hostname", "worker"]
    families: list[Metric] = []
    for name, doc, fact in DCGM:
        family = GaugeMetricFamily(name, doc, labels=labels)
        for e in snap.gpus:
            if e.get(fact) is not None and not e.get("virtual") and not e["stale"]:
                index = str(e.get("index", ""))
                family.add_metric(
                    [
                        index,
                        str(e.get("uuid", "")),
                        f"nvidia{index}",
                        str(e.get("name", "")),
                        str(e.get("host", "")),
                        e["worker"],
                    ],
                    float(e[fact]),
                )
        if family.samples:  # a fleet of virtual GPUs has none of these
            families.append(family)
    return families


def _delivery(snap: Snapshot) -> Iterable[Metric]:
    dead = CounterMetricFamily(
        "gpufleet_dead_letters",
        "Messages a trigger could not turn into tasks, sent to its dead-letter destination",
        labels=["trigger", "reason"],
    )
    for (trigger, reason), n in sorted(snap.dead_letters.items()):
        dead.add_metric([trigger, reason], n)
    return [
        dead,
        GaugeMetricFamily(
            "gpufleet_callback_backlog_records", "Callback records waiting for delivery", value=snap.callback_backlog
        ),
        GaugeMetricFamily(
            "gpufleet_callback_lag_seconds",
            "Age of the oldest callback record not yet delivered",
            value=snap.callback_oldest_age_s,
        ),
        CounterMetricFamily(
            "gpufleet_callbacks_delivered",
            "Callback records their destination acknowledged",
            value=snap.callbacks_delivered,
        ),
        GaugeMetricFamily(
            "gpufleet_parked_records", "Records a destination refused for good, waiting in parking", value=snap.parked
        ),
        *_destinations(snap),
    ]


def _destinations(snap: Snapshot) -> list[Metric]:
    """Each destination's own flow (gpufleet.delivery.flows): one that is down shows here, and holds only its
    records."""
    label = ["destination"]
    backlog = GaugeMetricFamily(
        "gpufleet_destination_backlog_records", "Records waiting for this destination", labels=label
    )
    lag = GaugeMetricFamily(
        "gpufleet_destination_lag_seconds", "Age of this destination's oldest waiting record", labels=label
    )
    delivered = CounterMetricFamily(
        "gpufleet_destination_delivered", "Records this destination acknowledged", labels=label
    )
    parked = CounterMetricFamily("gpufleet_destination_parked", "Records parked for this destination", labels=label)
    failures = GaugeMetricFamily(
        "gpufleet_destination_failures",
        "Deliveries to this destination that failed in a row (0: it delivers)",
        labels=label,
    )
    open_ = GaugeMetricFamily(
        "gpufleet_destination_breaker_open",
        "1 while this destination's circuit breaker is open: one record at a time until one passes",
        labels=label,
    )
    for d in snap.destinations:
        key = [d["destination"]]
        backlog.add_metric(key, d["backlog"])
        lag.add_metric(key, d["lag_s"])
        delivered.add_metric(key, d["delivered"])
        parked.add_metric(key, d["parked"])
        failures.add_metric(key, d["failures"])
        open_.add_metric(key, int(d["breaker"] == "open"))
    return [backlog, lag, delivered, parked, failures, open_]


def exposition(fleet: Fleet, registry: Registry) -> bytes:
    """The text exposition format of the whole fleet, read now."""
    from prometheus_client import generate_latest

    collectors = CollectorRegistry(auto_describe=False)
    collectors.register(FleetCollector(fleet, registry))
    return generate_latest(collectors)
