"""A sharded job with torch: a large image is cut into strips with a small overlap, each strip is filtered on a GPU,
and the strips are stitched back into one PNG.

``enhance`` (the job) reads only the image's header, and splits it into ``strips`` bands of rows. Each band is a
shard of ``enhance_strip``: its event is a reference (the image's URI and its rows), and the shard reads exactly
those bytes with an S3 range request (a binary PPM keeps each row at a known offset). It runs a filter bank on the
worker's device (CUDA when present), an unsharp mask from a 5x5 Gaussian and Sobel edges, and uploads its band. The
merge reads the bands back in order and writes the whole image.

Each band is read with ``HALO`` rows of its neighbours on either side, more than the 5x5 kernels reach, and those
rows are dropped after filtering: every output pixel sees the same neighbourhood as in one pass over the whole
image, so the stitched result equals a single-task run of :func:`enhance_pixels` (tests/test_enhance.py).

Invoke it with ``{"image": "s3://bucket/big.ppm", "output": "s3://bucket/enhanced", "strips": 8}``. Convert another
format with PIL: ``Image.open("in.png").convert("RGB").save("in.ppm")``.
"""

from __future__ import annotations

import os
import re
from typing import Any

from pydantic import BaseModel, Field

from gpufleet import Context, Gpu, function, job

HALO = 4  # rows of overlap on each side of a band: the 5x5 kernels reach 2
AMOUNT = 0.8  # unsharp mask: how much of the detail (image - blurred) is added back
MAX_PIXELS = 64_000_000
# The event names where the result goes: on a fleet whose key can write other buckets too, name the ones it may
# (ENHANCE_OUTPUT_BUCKETS=results,previews), and an upload anywhere else fails the task (OutputNotAllowed).
OUTPUT_BUCKETS = tuple(b for b in os.environ.get("ENHANCE_OUTPUT_BUCKETS", "").split(",") if b) or None
_HEADER = re.compile(rb"P6\s+(?:#[^\n]*\s+)*(\d+)\s+(?:#[^\n]*\s+)*(\d+)\s+(?:#[^\n]*\s+)*255\s")


class EnhanceRequest(BaseModel):
    image: str = Field(pattern=r"^s3://[^/]+/.+", description="a binary PPM (P6, 8-bit RGB)")
    output: str | None = Field(None, pattern=r"^s3://[^/]+", description="default: the trigger's output")
    strips: int = Field(8, ge=1, le=256)
    fail_once: list[int] = Field([], description="bands whose first attempt fails, to watch a retry (make demo)")


def read_header(data: bytes) -> tuple[int, int, int]:
    """(width, height, offset of the first pixel) of a binary PPM, from its first bytes."""
    found = _HEADER.match(data)
    if found is None:
        raise ValueError("not a binary PPM (P6, maxval 255): convert the image first")
    width, height = int(found[1]), int(found[2])
    if not 0 < width * height <= MAX_PIXELS:
        raise ValueError(f"a {width}x{height} image: 1 to {MAX_PIXELS} pixels")
    return width, height, found.end()


def enhance_pixels(rgb: Any, device: Any) -> tuple[Any, Any]:
    """The filter bank over an ``H x W x 3`` uint8 tensor: the sharpened image (uint8, same shape) and each row's
    mean edge energy (``H`` floats). Rows and columns beyond the edges repeat the edge (replicate), in a band as in
    the whole image."""
    import torch
    import torch.nn.functional as F  # noqa: N812 - torch's own convention

    x = rgb.to(device).permute(2, 0, 1).unsqueeze(0).float().div(255)
    g = torch.exp(-((torch.arange(5, device=device, dtype=torch.float32) - 2) ** 2) / 2)
    gauss = (g[:, None] * g[None, :] / g.sum() ** 2).expand(3, 1, 5, 5)
    sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device)
    with torch.inference_mode():
        blurred = F.conv2d(F.pad(x, (2, 2, 2, 2), mode="replicate"), gauss, groups=3)
        sharp = (x + AMOUNT * (x - blurred)).clamp(0, 1)
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        edges = F.conv2d(F.pad(gray, (1, 1, 1, 1), mode="replicate"), torch.stack([sobel, sobel.T]).unsqueeze(1))
        energy = edges.pow(2).sum(1).sqrt()[0].mean(1).cpu()
    out = sharp.mul(255).round().to(torch.uint8)[0].permute(1, 2, 0).contiguous().cpu()
    return out, energy


def as_bytes(tensor: Any) -> bytes:
    """A CPU uint8 tensor's bytes, in row order, without numpy (the CPU torch wheel does not pull it in)."""
    import ctypes

    tensor = tensor.contiguous()
    return ctypes.string_at(tensor.data_ptr(), tensor.numel())


@function(
    name="enhance_strip",
    gpu=Gpu(model="any"),
    timeout_s=300,
    max_attempts=3,
    backoff_s=0.5,
    output_buckets=OUTPUT_BUCKETS,
)
def enhance_strip(event: dict[str, Any], ctx: Context) -> dict[str, Any]:
    """One band: read its rows (and the halo) by byte range, filter them, upload the band's own rows."""
    import torch

    if event["fail_once"] and ctx.attempt == 1:
        raise RuntimeError(f"band {event['index']}: failing its first attempt on purpose (fail_once)")
    width, offset = event["width"], event["offset"]
    (top, bottom), (first, last) = event["rows"], event["read"]
    raw = ctx.read(event["image"], offset + first * width * 3, offset + last * width * 3)
    ctx.progress(0.4, f"read rows {first}-{last}")
    pixels = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(last - first, width, 3)
    out, energy = enhance_pixels(pixels, ctx.state)
    mine = slice(top - first, bottom - first)  # the band's own rows, without the halo
    band = ctx.scratch / f"band-{event['index']:04d}.rgb"
    band.write_bytes(as_bytes(out[mine]))
    uri = ctx.upload(band, content_type="application/octet-stream", to=event["output"])
    return {"band": uri, "rows": [top, bottom], "edge_energy": float(energy[mine].mean()), "device": str(ctx.state)}


@enhance_strip.setup
def pick_device() -> Any:
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@job(
    name="enhance",
    shard=enhance_strip,
    max_shards=256,
    timeout_s=600,
    max_attempts=2,
    payload=EnhanceRequest,
    output_buckets=OUTPUT_BUCKETS,
)
def enhance(event: EnhanceRequest, ctx: Context) -> list[dict[str, Any]]:
    """Split: the header says the size; each band is a reference to its rows, with a halo of its neighbours'."""
    width, height, offset = read_header(ctx.read(event.image, 0, 256))
    n = min(event.strips, height)
    cuts = [height * i // n for i in range(n + 1)]
    return [{"image": event.image, "output": event.output, "index": i, "width": width, "offset": offset,
             "rows": [cuts[i], cuts[i + 1]], "read": [max(0, cuts[i] - HALO), min(height, cuts[i + 1] + HALO)],
             "fail_once": i in event.fail_once} for i in range(n)]  # fmt: skip


@enhance.merge
def stitch(event: EnhanceRequest, results: list[dict[str, Any]], ctx: Context) -> dict[str, Any]:
    """Merge: the bands back in order, as one PNG next to them."""
    from PIL import Image

    width, height, _ = read_header(ctx.read(event.image, 0, 256))
    pixels = bytearray()
    for i, band in enumerate(results):
        pixels += ctx.read(band["band"])
        ctx.progress((i + 1) / len(results) * 0.8, f"read band {i + 1}/{len(results)}")
    out = ctx.scratch / "enhanced.png"
    Image.frombytes("RGB", (width, height), bytes(pixels)).save(out, "PNG", compress_level=1)
    uri = ctx.upload(out, content_type="image/png", to=event.output)
    energy = sum(b["edge_energy"] * (b["rows"][1] - b["rows"][0]) for b in results) / height
    return {"image": uri, "size": [width, height], "bands": len(results), "edge_energy": round(energy, 6),
            "device": results[0]["device"]}  # fmt: skip
