"""The sharded example (workers/enhance.py) end to end: an image in S3 (moto), split into bands, filtered with torch
on two virtual GPUs, stitched, and compared with one pass of the same filter over the whole image."""

from __future__ import annotations

import io
import time
from pathlib import Path
from typing import Any

import pytest

from gpufleet.config import load_functions
from gpufleet.control.plane import ControlPlane
from gpufleet.dev.services import S3Service
from tests.harness import FleetHarness
from tests.integration.test_object_pull import s3_settings
from tests.s3util import s3_client

torch = pytest.importorskip("torch")
Image = pytest.importorskip("PIL.Image")
WORKERS = Path(__file__).parents[2] / "workers"
WIDTH, HEIGHT = 320, 203  # a height no band count divides


def picture() -> Any:
    """A deterministic RGB image with edges and texture: gradients, stripes and seeded noise."""
    gen = torch.Generator().manual_seed(14)
    y, x = torch.meshgrid(torch.arange(HEIGHT), torch.arange(WIDTH), indexing="ij")
    r = (x * 255 // WIDTH).to(torch.uint8)
    g = ((y // 16 + x // 16) % 2 * 200).to(torch.uint8)
    b = torch.randint(0, 256, (HEIGHT, WIDTH), generator=gen, dtype=torch.uint8)
    return torch.stack([r, g, b], dim=2)


def ppm(pixels: Any) -> bytes:
    header = f"P6\n# made by tests/integration/test_enhance.py\n{WIDTH} {HEIGHT}\n255\n"
    return header.encode() + bytes(pixels.flatten().tolist())


def run(plane: ControlPlane, event: dict[str, Any], timeout_s: float = 120) -> dict[str, Any]:
    job = plane.invoke("enhance", event).id
    deadline = time.monotonic() + timeout_s
    while (view := plane.status(job))["state"] not in ("SUCCEEDED", "FAILED", "CANCELLED"):
        assert time.monotonic() < deadline, view
        time.sleep(0.3)
    return view


def test_the_stitched_bands_equal_one_pass_over_the_whole_image(harness: FleetHarness, moto: S3Service) -> None:
    s3 = s3_client(moto.url)
    bucket = f"img-{harness.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    pixels = picture()
    s3.put_object(Bucket=bucket, Key="in/big.ppm", Body=ppm(pixels))
    harness.write_config(s3=s3_settings(moto), functions=[str(WORKERS)])
    harness.start_host("h1", ["default"], virtual_gpus=2)
    plane = ControlPlane(harness.fleet())
    event = {"image": f"s3://{bucket}/in/big.ppm", "output": f"s3://{bucket}/out", "strips": 7, "fail_once": [2]}
    view = run(plane, event)
    assert view["state"] == "SUCCEEDED", view
    assert view["result"]["size"] == [WIDTH, HEIGHT] and view["result"]["bands"] == 7
    bands = view["shards"]["items"]
    assert [s["attempts"] for s in bands] == [1, 1, 2, 1, 1, 1, 1]  # the one made to fail once, retried alone
    assert all(s["outputs"][0].startswith(f"s3://{bucket}/out/{s['id']}/") for s in bands)
    merged_key = view["result"]["image"].removeprefix(f"s3://{bucket}/")
    merged = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=merged_key)["Body"].read())).convert("RGB")
    got = torch.frombuffer(bytearray(merged.tobytes()), dtype=torch.uint8).view(HEIGHT, WIDTH, 3)

    # One pass of the same filter over the whole image, here: the bands' halos make the result bit for bit the same.
    enhance = load_functions([WORKERS])["enhance_strip"]
    module = __import__(enhance.handler.__module__, fromlist=["enhance_pixels"])
    whole, energy = module.enhance_pixels(pixels, torch.device("cpu"))
    assert torch.equal(got, whole), f"{int((got.int() - whole.int()).abs().max())} levels apart at most"
    assert view["result"]["edge_energy"] == pytest.approx(float(energy.mean()), rel=1e-5)
    assert not torch.equal(whole, pixels)  # it did change the image

    single = run(plane, {**event, "strips": 1, "fail_once": []})  # the same job as a single task
    key = single["result"]["image"].removeprefix(f"s3://{bucket}/")
    one = Image.open(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read())).convert("RGB")
    assert one.tobytes() == merged.tobytes()


def test_a_file_that_is_not_a_ppm_fails_the_job_with_why(harness: FleetHarness, moto: S3Service) -> None:
    s3 = s3_client(moto.url)
    bucket = f"img-{harness.prefix.lower()}"
    s3.create_bucket(Bucket=bucket)
    s3.put_object(Bucket=bucket, Key="in/x.png", Body=b"\x89PNG\r\n\x1a\n not a ppm")
    harness.write_config(s3=s3_settings(moto), functions=[str(WORKERS)])
    harness.start_host("h1", ["default"], virtual_gpus=1)
    plane = ControlPlane(harness.fleet())
    view = run(plane, {"image": f"s3://{bucket}/in/x.png", "output": f"s3://{bucket}/out"})
    assert view["state"] == "FAILED" and "not a binary PPM" in view["error"]["errorMessage"], view
