"""Image thumbnails and features with torch: a file dropped in a bucket becomes a thumbnail next to the outputs.

Bind it to a bucket with a trigger (see triggers/bucket-events.yaml.example). For each image it:
1. downloads the object to the task's scratch directory (streamed);
2. resizes it on the worker's device (CUDA when present) with antialiased bilinear interpolation;
3. measures it: mean colour, edge energy (Sobel filter) and a 16-bin brightness histogram;
4. uploads the thumbnail as PNG to the trigger's ``output`` location, which the success record lists.
"""

from __future__ import annotations

from pathlib import PurePosixPath
from typing import Any

from gpufleet import Context, Gpu, ObjectEvent, function

THUMB_PX = 128
MAX_PIXELS = 64_000_000  # refuse decompression bombs


@function(name="thumbnail", gpu=Gpu(model="any"), timeout_s=300, max_attempts=3, backoff_s=0.5, payload=ObjectEvent)
def thumbnail(event: ObjectEvent, ctx: Context) -> dict[str, Any]:
    import torch
    from PIL import Image

    device = ctx.state
    path = ctx.download()
    ctx.progress(0.3, "downloaded")
    Image.MAX_IMAGE_PIXELS = MAX_PIXELS
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    width, height = rgb.size
    pixels = torch.frombuffer(bytearray(rgb.tobytes()), dtype=torch.uint8).to(device)
    x = pixels.view(height, width, 3).permute(2, 0, 1).float().div(255).unsqueeze(0)
    with torch.inference_mode():
        scale = THUMB_PX / max(width, height)
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        thumb = torch.nn.functional.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)
        gray = (x * torch.tensor([0.299, 0.587, 0.114], device=device).view(1, 3, 1, 1)).sum(1, keepdim=True)
        sobel = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]], device=device)
        kernels = torch.stack([sobel, sobel.T]).unsqueeze(1)
        edges = torch.nn.functional.conv2d(gray, kernels, padding=1).pow(2).sum(1).sqrt()
        histogram = torch.histc(gray, bins=16, min=0.0, max=1.0)
    ctx.progress(0.7, "resized")
    out = ctx.scratch / f"{PurePosixPath(event.key).stem or 'object'}.thumb.png"
    array = thumb[0].clamp(0, 1).mul(255).round().byte().permute(1, 2, 0).contiguous().cpu()
    # Through bytes, not .numpy(): the CPU torch wheel does not pull numpy in.
    Image.frombytes("RGB", (array.shape[1], array.shape[0]), bytes(array.flatten().tolist())).save(out, "PNG")
    uri = ctx.upload(out, content_type="image/png")
    ctx.progress(1.0, "uploaded")
    return {
        "source": event.uri,
        "size": [width, height],
        "thumbnail": uri,
        "thumbnail_size": [int(size[1]), int(size[0])],
        "mean_rgb": [round(v, 4) for v in x.mean(dim=(0, 2, 3)).tolist()],
        "edge_energy": round(float(edges.mean()), 5),
        "histogram": [round(v / (width * height), 4) for v in histogram.tolist()],
        "device": str(device),
    }


@thumbnail.setup
def pick_device() -> Any:
    """Once per GPU worker process: the device, warmed with a tiny resize so the first task pays no CUDA start."""
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.nn.functional.interpolate(torch.zeros(1, 3, 8, 8, device=device), size=(4, 4), mode="bilinear")
    return device
