"""The demo's bucket part: images dropped into a bucket become thumbnails, through S3 -> SQS notifications.

The bucket lives on moto (S3 + SQS, in memory). Its notification configuration sends every new ``images/*.png`` to
an SQS queue, which the demo's ``thumbnail`` trigger reads: the AWS path, end to end.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Any

import yaml

BUCKET = "gpufleet-demo"
QUEUE = "gpufleet-demo-images"
IMAGES = [
    ("images/sunrise gradient.png", "gradient"),
    ("images/rings.png", "rings"),
    ("images/checkerboard.png", "checker"),
    ("images/2026/noise+stripes.png", "stripes"),
]


def clients(url: str) -> tuple[Any, Any]:
    import boto3

    kw = {
        "endpoint_url": url,
        "region_name": "us-east-1",
        "aws_access_key_id": "testing",
        "aws_secret_access_key": "testing",
    }
    return boto3.client("s3", **kw), boto3.client("sqs", **kw)


def setup(url: str) -> None:
    """The bucket, the queue and the bucket's notification configuration (new PNGs under images/ -> the queue)."""
    s3, sqs = clients(url)
    s3.create_bucket(Bucket=BUCKET)
    queue_url = sqs.create_queue(QueueName=QUEUE)["QueueUrl"]
    arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"]["QueueArn"]
    rules = [{"Name": "prefix", "Value": "images/"}, {"Name": "suffix", "Value": ".png"}]
    s3.put_bucket_notification_configuration(
        Bucket=BUCKET,
        NotificationConfiguration={
            "QueueConfigurations": [
                {"QueueArn": arn, "Events": ["s3:ObjectCreated:*"], "Filter": {"Key": {"FilterRules": rules}}}
            ]
        },
    )


def write_trigger(folder: Path) -> None:
    """The demo's trigger file: what a user writes for a bucket on AWS (with their own queue)."""
    folder.mkdir(parents=True, exist_ok=True)
    trigger = {
        "source": f"sqs:///{QUEUE}",
        "function": "thumbnail",
        "events": ["ObjectCreated:*"],
        "prefix": "images/",
        "suffix": ".png",
        "output": f"s3://{BUCKET}/thumbnails",
        "wait_time_s": 1,
    }
    (folder / "demo-images.yaml").write_text(yaml.safe_dump(trigger, sort_keys=False))


def upload_images(url: str) -> int:
    s3, _ = clients(url)
    for key, pattern in IMAGES:
        s3.put_object(Bucket=BUCKET, Key=key, Body=_png(pattern), ContentType="image/png")
    return len(IMAGES)


def report(url: str, records: list[dict[str, Any]]) -> int:
    """Print each thumbnail record; returns how many thumbnails are really in the bucket."""
    s3, _ = clients(url)
    found = 0
    print("\nbucket events -> thumbnails:")
    for body in records:
        out = body["responsePayload"]
        key = out["thumbnail"].removeprefix(f"s3://{BUCKET}/")
        size = s3.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        found += 1
        print(
            f"  {out['source']:<42} {out['size'][0]}x{out['size'][1]} -> {out['thumbnail']} ({size} B, "
            f"{out['thumbnail_size'][0]}x{out['thumbnail_size'][1]}) edges={out['edge_energy']} "
            f"rgb={out['mean_rgb']}"
        )
    return found


def _png(pattern: str, width: int = 480, height: int = 320) -> bytes:
    """A generated test image, so the demo needs no files: each pattern gives the features something to see."""
    from PIL import Image

    image = Image.new("RGB", (width, height))
    pixels = image.load()
    assert pixels is not None
    for y in range(height):
        for x in range(width):
            if pattern == "gradient":
                value = (x * 255 // width, y * 255 // height, 160)
            elif pattern == "rings":
                r = int(math.hypot(x - width / 2, y - height / 2)) // 12 % 2 * 255
                value = (r, 64, 255 - r)
            elif pattern == "checker":
                value = (255, 255, 255) if (x // 40 + y // 40) % 2 else (20, 20, 20)
            else:
                shade = (x * 7 + y * 13) % 97 * 2
                value = (shade, 255 - shade, (x // 16 % 2) * 200)
            pixels[x, y] = value
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()
