"""Text embedding with torch: a hashed character n-gram bag projected by a two-layer network.

Real tensor work, on CUDA when the worker's GPU has it and on the CPU otherwise. The network is built once per
worker process in setup(), so it stays warm across tasks. The weights are seeded, so the same text gives the same
embedding on every worker.

``embed`` takes one text per task. ``embed-batch`` is the same model with dynamic batching: the worker hands it the
texts of up to 32 queued tasks, which go through the network in one forward pass, and each task still gets its own
result and record.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Any

from pydantic import BaseModel, Field

from gpufleet import Batch, BatchContext, Context, Gpu, function

BUCKETS = 1 << 14
DIM = 256


class EmbedRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    ngram: int = Field(3, ge=1, le=8)


@function(name="embed", gpu=Gpu(model="any"), timeout_s=300, max_attempts=3, backoff_s=0.5, payload=EmbedRequest)
def embed(event: EmbedRequest, ctx: Context) -> dict[str, Any]:
    import torch

    model, device = ctx.state
    bag, grams = _bag(event, device)
    ctx.progress(0.2, f"{grams} n-grams")
    with torch.inference_mode():
        vector = torch.nn.functional.normalize(model(bag.unsqueeze(0)), dim=1)[0]
    ctx.progress(1.0, "embedded")
    return _result(vector, device, grams)


@function(name="embed-batch", gpu=Gpu(model="any"), timeout_s=300, max_attempts=3, backoff_s=0.5,
          payload=EmbedRequest, batch=Batch(max_size=32, max_wait_ms=20))  # fmt: skip
def embed_batch(events: list[EmbedRequest], ctx: BatchContext) -> list[dict[str, Any]]:
    """The texts of a whole batch in one forward pass: one (batch, BUCKETS) matrix in, one row per text out."""
    import torch

    model, device = ctx.state
    bags = [_bag(event, device) for event in events]
    with torch.inference_mode():
        vectors = torch.nn.functional.normalize(model(torch.stack([bag for bag, _ in bags])), dim=1)
    return [_result(vector, device, grams) for vector, (_, grams) in zip(vectors, bags, strict=True)]


def _bag(event: EmbedRequest, device: Any) -> tuple[Any, int]:
    """The text's hashed n-gram counts, and how many n-grams it has."""
    import torch

    text = event.text.lower()
    grams = [text[i : i + event.ngram] for i in range(max(1, len(text) - event.ngram + 1))]
    index = torch.tensor([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "big") % BUCKETS
                          for g in grams], device=device)  # fmt: skip
    return torch.zeros(BUCKETS, device=device).index_add_(0, index, torch.ones(len(grams), device=device)), len(grams)


def _result(vector: Any, device: Any, grams: int) -> dict[str, Any]:
    return {
        "dim": DIM,
        "device": str(device),
        "ngrams": grams,
        "head": [round(x, 5) for x in vector[:8].tolist()],
        "sha256": hashlib.sha256(repr([round(x, 5) for x in vector.tolist()]).encode()).hexdigest()[:16],
    }


@embed_batch.setup
@embed.setup
@functools.cache  # one model per worker process, shared by both functions
def load_model() -> tuple[Any, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(BUCKETS, 512), torch.nn.GELU(), torch.nn.Linear(512, DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.to(device).eval(), device
