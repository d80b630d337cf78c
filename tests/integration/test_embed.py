"""The batching example (workers/embed.py) on a real worker: ``embed-batch`` embeds the texts of queued tasks in one
forward pass, and each task gets the same embedding ``embed`` gives it alone."""

from __future__ import annotations

import time
from pathlib import Path

import orjson
import pytest

from gpufleet.control.plane import ControlPlane
from tests.harness import FleetHarness

pytest.importorskip("torch")
WORKERS = Path(__file__).parents[2] / "workers"
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa", "lambda", "mu"]
TEXTS = [f"{word} number {n}: the quick brown fox jumps over a lazy dog" * (1 + n % 3) for n, word in enumerate(WORDS)]


def test_a_batch_of_texts_in_one_forward_pass_gives_each_task_its_own_embedding(harness: FleetHarness) -> None:
    harness.write_config(functions=[str(WORKERS)])
    plane = ControlPlane(harness.fleet())
    # Queued before the worker starts, so they form batches as soon as it takes the first.
    batched = [plane.invoke("embed-batch", {"text": text}).id for text in TEXTS]
    alone = [plane.invoke("embed", {"text": text}).id for text in TEXTS]
    harness.start_host("h1", ["default"], virtual_gpus=1)
    deadline = time.monotonic() + 120
    while any(plane.status(i)["state"] not in ("SUCCEEDED", "FAILED") for i in batched + alone):
        assert time.monotonic() < deadline, "the embeddings did not finish"
        time.sleep(0.3)
    views = {i: plane.status(i) for i in batched + alone}
    assert all(v["state"] == "SUCCEEDED" and v["attempts"] == 1 for v in views.values()), views
    for one, single in zip(batched, alone, strict=True):
        a, b = views[one]["result"], views[single]["result"]
        assert a["dim"] == b["dim"] == 256 and a["ngrams"] == b["ngrams"] and a["device"] == b["device"]
        assert a["head"] == pytest.approx(b["head"], abs=2e-5)  # one row of a batched matmul, the same vector
    assert len({tuple(views[i]["result"]["head"]) for i in batched}) == len(TEXTS)  # each its own text's
    lines = (harness.dir / "host-h1.log").read_text(errors="replace").splitlines()
    starts = [orjson.loads(line) for line in lines if '"batch started"' in line]
    sizes = [s["size"] for s in starts if s["function"] == "embed-batch"]
    assert sizes and max(sizes) > 1 and sum(sizes) == len(TEXTS), sizes  # a batch of several, each text once
