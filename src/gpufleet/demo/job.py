"""The demo's sharded job: a 4096x4096 image in the bucket, enhanced in 8 bands by ``enhance`` (workers/enhance.py)
on the fleet's GPUs, one band made to fail its first attempt. Shows the job's progress and each band's state, then
the stitched image's URI."""

from __future__ import annotations

import ctypes
import time
from typing import Any

from gpufleet.cli.progress import bar_line
from gpufleet.cli.views import shard_counts, shard_table
from gpufleet.demo.api import client
from gpufleet.demo.bucket import BUCKET, clients

SIDE, BANDS, FAILS = 4096, 8, 3  # the image's width and height, its bands, and the band that fails once
KEY = f"big/pattern-{SIDE}.ppm"


def job_tour(fleet: Any, moto_url: str, timeout_s: float = 180) -> tuple[int, str]:
    s3, _ = clients(moto_url)
    s3.put_object(Bucket=BUCKET, Key=KEY, Body=_ppm(SIDE))
    _, call = client(fleet)
    event = {
        "image": f"s3://{BUCKET}/{KEY}",
        "output": f"s3://{BUCKET}/enhanced",
        "strips": BANDS,
        "fail_once": [FAILS],
    }
    status, made = call("POST", "/v1/functions/enhance/invocations", event)
    if status != 202:
        return 1, f"job: not accepted ({status} {made})"
    job = made["id"]
    print(f"\ndemo: a sharded job: s3://{BUCKET}/{KEY} ({SIDE}x{SIDE}) in {BANDS} bands, band {FAILS} failing once")
    print(f"  POST /v1/functions/enhance/invocations -> 202 {made}   (gpufleet status {job} shows the same)")
    shown, deadline = "", time.monotonic() + timeout_s
    view: dict[str, Any] = {}
    while time.monotonic() < deadline:
        _, view = call("GET", f"/v1/tasks/{job}")
        shards = view.get("shards")
        counts = shard_counts(shards)
        now = f"{view['state']} {view.get('phase')} {counts}"
        if now != shown:  # a line each time a band changes state
            fraction = shards["progress"] if shards else 0.0
            print(f"  {bar_line({**view, 'progress': {'fraction': fraction, 'message': counts or view.get('phase')}})}")
            shown = now
        if view["state"] in ("SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT", "EXPIRED"):
            break
        time.sleep(0.3)
    if view.get("shards"):
        print("\n".join(f"  {row}" for row in shard_table(view["shards"]["items"]).splitlines()))
    if view.get("state") != "SUCCEEDED":
        return 1, f"job: enhance {view.get('state', 'no outcome')}"
    result = view["result"]
    size = s3.head_object(Bucket=BUCKET, Key=result["image"].removeprefix(f"s3://{BUCKET}/"))["ContentLength"]
    retried = sum(1 for s in view["shards"]["items"] if s["attempts"] > 1)
    print(f"  merged: {result['image']} ({size} B, {result['size'][0]}x{result['size'][1]}, {result['device']})")
    return 0, f"job: enhance {BANDS} bands, {retried} retried, {view['state']}"


def _ppm(side: int) -> bytes:
    """A generated picture with edges to sharpen: gradients, a checkerboard and stripes."""
    import torch

    y, x = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    rgb = torch.stack([(x * 255 // side), (x // 64 + y // 64) % 2 * 200, (x * 7 + y * 13) % 97 * 2], dim=2)
    pixels = rgb.to(torch.uint8).contiguous()
    return f"P6\n{side} {side}\n255\n".encode() + ctypes.string_at(pixels.data_ptr(), pixels.numel())
