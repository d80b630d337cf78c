"""Text embedding with torch: a hashed character n-gram bag projected by a two-layer network.

Real tensor work, on CUDA when the worker's GPU has it and on the CPU otherwise. The network is built once per
worker process in setup(), so it stays warm across tasks. The weights are seeded, so the same text gives the same
embedding on every worker.
"""

from __future__ import annotations

import hashlib
from typing import Any

from pydantic import BaseModel, Field

from gpufleet import Context, Gpu, function

BUCKETS = 1 << 14
DIM = 256


class EmbedRequest(BaseModel):
    text: str = Field(min_length=1, max_length=100_000)
    ngram: int = Field(3, ge=1, le=8)


@function(name="embed", gpu=Gpu(model="any"), timeout_s=300, max_attempts=3, backoff_s=0.5, payload=EmbedRequest)
def embed(event: EmbedRequest, ctx: Context) -> dict[str, Any]:
    import torch

    model, device = ctx.state
    text = event.text.lower()
    grams = [text[i : i + event.ngram] for i in range(max(1, len(text) - event.ngram + 1))]
    ctx.progress(0.2, f"{len(grams)} n-grams")
    index = torch.tensor([int.from_bytes(hashlib.blake2b(g.encode(), digest_size=4).digest(), "big") % BUCKETS
                          for g in grams], device=device)  # fmt: skip
    bag = torch.zeros(BUCKETS, device=device).index_add_(0, index, torch.ones(len(grams), device=device))
    with torch.inference_mode():
        vector = torch.nn.functional.normalize(model(bag.unsqueeze(0)), dim=1)[0]
    ctx.progress(1.0, "embedded")
    return {
        "dim": DIM,
        "device": str(device),
        "ngrams": len(grams),
        "head": [round(x, 5) for x in vector[:8].tolist()],
        "sha256": hashlib.sha256(repr([round(x, 5) for x in vector.tolist()]).encode()).hexdigest()[:16],
    }


@embed.setup
def load_model() -> tuple[Any, Any]:
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    generator = torch.Generator().manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(BUCKETS, 512), torch.nn.GELU(), torch.nn.Linear(512, DIM))
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    return model.to(device).eval(), device
