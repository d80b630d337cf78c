"""Helpers for tests against the local S3 servers (moto, SeaweedFS): boto3 clients and start-or-skip."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any, TypeVar

import pytest

IN_CI = os.environ.get("CI", "").lower() == "true"
REGION = "us-east-1"
MOTO_KEY = "testing"  # moto accepts any key and secret

T = TypeVar("T")


def start_or_skip(what: str, start: Callable[[], T]) -> T:
    """Run ``start``; on ServiceError skip the test on a laptop but fail it under ``CI=true``, showing the log."""
    from gpufleet.errors import ServiceError

    try:
        return start()
    except ServiceError as exc:
        if IN_CI:
            pytest.fail(f"{what} failed to start under CI:\n{exc}")
        pytest.skip(f"{what} unavailable: {exc}")


def _client(service: str, url: str, access_key: str, secret_key: str) -> Any:
    import boto3
    from botocore.config import Config

    # Path style: the endpoint is an IP address, where virtual-host buckets cannot resolve.
    config = Config(s3={"addressing_style": "path"}, retries={"total_max_attempts": 3})
    return boto3.client(
        service,
        endpoint_url=url,
        region_name=REGION,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        config=config,
    )


def s3_client(url: str, access_key: str = MOTO_KEY, secret_key: str = MOTO_KEY) -> Any:
    """A boto3 S3 client for a local endpoint; close it with ``.close()`` (or ``contextlib.closing``)."""
    return _client("s3", url, access_key, secret_key)


def sqs_client(url: str, access_key: str = MOTO_KEY, secret_key: str = MOTO_KEY) -> Any:
    """A boto3 SQS client for moto's endpoint (the same URL as its S3)."""
    return _client("sqs", url, access_key, secret_key)


def sns_client(url: str, access_key: str = MOTO_KEY, secret_key: str = MOTO_KEY) -> Any:
    """A boto3 SNS client for moto's endpoint (the same URL as its S3)."""
    return _client("sns", url, access_key, secret_key)
