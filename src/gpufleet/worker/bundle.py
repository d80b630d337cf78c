"""What one pool process holds: the fleet, this worker's identity, and its clients, made after fork.

The attempt (:mod:`gpufleet.worker.attempt`), the handler's ``ctx`` and the outcome writer are built from this bundle
alone. Each client is made on first use, so the worker's parent process, which uses only the registry (to hand back
the tasks of a pool process that died), makes only that one; the pool process takes a :meth:`fresh` bundle after the
fork and never reuses its parent's sockets.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from pathlib import Path

import structlog

from gpufleet.aws import ObjectStore
from gpufleet.config import Fleet
from gpufleet.functions import MAX_TIMEOUT_S
from gpufleet.registry.checkpoints import Checkpoints
from gpufleet.registry.keyspace import Keyspace
from gpufleet.registry.messages import Envelopes, MessageFactory, parse_queue
from gpufleet.registry.store import Registry
from gpufleet.registry.tally import Tally
from gpufleet.scheduling.gpumodels import MIG_SLICES
from gpufleet.worker.batchfit import BatchFit
from gpufleet.worker.gpus import Device, load_nvml
from gpufleet.worker.holds import Holds
from gpufleet.worker.lease import LeaseKeeper
from gpufleet.worker.scratch import default_root, open_root
from gpufleet.worker.warmup import Affinity, Setups
from gpufleet.worker.watchdog import SharedSlot

log = structlog.get_logger("gpufleet.worker")


class ProcessBundle:
    """One pool process's fleet, identity and clients. ``on_overdue`` is told of a task whose handler ignored its
    cancel for ``cancel_grace_s`` (the attempt runner sets it)."""

    def __init__(
        self,
        fleet: Fleet,
        worker_name: str,
        gpu: str,
        slot: SharedSlot | None = None,
        device: str = "",
        holds_on: tuple[int, ...] = (),
        queues: list[str] | None = None,
    ) -> None:
        self.fleet = fleet
        # The indices of the host's GPUs this process runs on, where another worker shares them (see holds): one
        # entry per GPU a task here holds.
        self.holds_on = holds_on
        self.gpu_count = max(1, len(holds_on))
        self.queues = queues or []  # the queues this process reads
        self.worker_name = worker_name
        self.gpu = gpu
        # The label is <slot>:<model>, e.g. gpu0:H100, or gpu0.mig3:H100:1g.10gb for a MIG instance.
        self.gpu_model = gpu.partition(":")[2] or "virtual"
        self.device_uuid = device  # NVML's UUID of the GPU (a group's, comma-separated); "" for a virtual one
        self.slot = slot or SharedSlot()  # shared with the parent process, which watches it (see watchdog)
        worker = fleet.settings.worker
        self.host = worker.hostname
        self.lease_s = worker.lease_s
        self.kill_grace_s = worker.kill_grace_s
        self.scratch_root: Path = worker.scratch_dir or default_root()
        self.on_overdue: Callable[[str, str], None] = lambda task_id, token: None
        # The wait and duration histograms' observations, written about once a second (by the lease keeper).
        self.tally = Tally(Keyspace(fleet.settings.redis.key_prefix))

    def fresh(self) -> ProcessBundle:
        """The same process identity with no client made yet: a forked pool process's own."""
        return ProcessBundle(
            self.fleet, self.worker_name, self.gpu, self.slot, self.device_uuid, self.holds_on, self.queues
        )

    @functools.cached_property
    def checkpoints(self) -> Checkpoints:
        """The states handlers save (``ctx.checkpoint``): kept as long as a record, and the longest task."""
        url, ttl = self.fleet.settings.worker.checkpoint_url, self.registry.retention_s + MAX_TIMEOUT_S
        return Checkpoints(self.registry, lambda: self.objects, url, ttl)

    @functools.cached_property
    def holds(self) -> Holds:
        """The GPUs this process holds to run a task, where another worker shares them (see holds)."""
        reserve = self.fleet.settings.worker.reserve_after_s
        return Holds(self.registry, self.host, self.worker_name, self.holds_on, reserve, self.queues)

    def check_scratch(self) -> None:
        """Create the scratch root (0700) or check an existing one, so that a root another user owns stops the
        worker when it starts rather than failing each task.

        Raises:
            ConfigError: the root is a symlink, not a directory, or another user's.
        """
        os.close(open_root(self.scratch_root))

    @functools.cached_property
    def registry(self) -> Registry:
        return Registry.for_fleet(self.fleet.settings)

    @functools.cached_property
    def device(self) -> Device:
        """This process's GPU, for its memory: what a claim and ``ctx.gpu_memory`` see."""
        return Device(self.device_uuid, load_nvml(self.fleet.settings.worker.fake_nvml))

    @functools.cached_property
    def gpu_hour_price(self) -> float | None:
        """What one hour of this GPU costs (``worker.gpu_hour_price``, by model), or None. A MIG instance costs its
        share of its GPU's compute slices (``1g.10gb``: 1 of an H100's 7)."""
        prices = {model.lower(): price for model, price in self.fleet.settings.worker.gpu_hour_price.items()}
        model, _, profile = self.gpu_model.lower().partition(":")
        price = prices.get(model)
        return price * int(profile.split("g.")[0]) / MIG_SLICES if price is not None and profile else price

    @functools.cached_property
    def batch_fit(self) -> BatchFit:
        return BatchFit(self.registry, self.gpu_model)

    @functools.cached_property
    def objects(self) -> ObjectStore:
        return ObjectStore(self.fleet.settings.s3)

    @functools.cached_property
    def lease(self) -> LeaseKeeper:
        """The thread that renews the running tasks' leases and watches for their cancel; started on first use."""
        grace = self.fleet.settings.worker.cancel_grace_s
        keeper = LeaseKeeper(
            self.registry, self.lease_s, grace, lambda task_id, token: self.on_overdue(task_id, token), self.tally_tick
        )
        keeper.name = f"gpufleet-lease-{os.getpid()}"
        keeper.start()
        return keeper

    def tally_tick(self) -> None:
        if self.tally.due():
            self.write_tally()
        self.affinity.tick()  # made at boot, in the main thread (Runtime.boot); a no-op with routing off

    def write_tally(self) -> None:
        """Write the observations now: at a shutdown, or with an outcome written on its own (this process may be
        about to die)."""
        if not self.tally.pending:
            return
        pipe = self.registry.pipeline()
        self.tally.write(pipe)
        try:
            pipe.execute()
        except Exception:  # a Redis blip: these observations are lost, the tasks' records are not
            log.warning("cannot write the wait and duration histograms", exc_info=True)

    @functools.cached_property
    def setups(self) -> Setups:
        worker = self.fleet.settings.worker
        return Setups(self.registry, self.worker_name, worker.setup_retry_s, worker.warm_functions, self.tally)

    @functools.cached_property
    def queue_fn(self) -> dict[str, str]:
        """Each of this process's function queues -> its function (the pool and model queues of older releases, which
        may hold any function's task, have none)."""
        prefix = self.fleet.settings.redis.key_prefix
        return {q: parsed[2] for q in self.queues if (parsed := parse_queue(prefix, q)) and parsed[2]}

    @functools.cached_property
    def affinity(self) -> Affinity:
        """Which of its queues this process reads first, and which it leaves to workers with their model loaded."""
        return Affinity(self.setups, self.registry, self.queue_fn, self.fleet.settings.worker.cold_wait_s)

    @functools.cached_property
    def envelopes(self) -> Envelopes:
        """Builds a task's message again: to give back a task claimed ahead, or to queue a job's merge step."""
        factory = MessageFactory(self.fleet.settings.redis.key_prefix, self.kill_grace_s)
        return Envelopes(factory, self.fleet.functions)
