"""S3 event records as MinIO and Ceph send them, shared by the parser tests and the end-to-end push tests.

Each builder follows its server's documented sample (cited in its docstring). The keyword arguments vary only what a
test needs: the rest of the record stays as the server writes it.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import unquote_plus

MINIO_ETAG = "430f89010c77aa34fc8760696da62d08"
CEPH_ETAG = "37b51d194a7513e45b56f6524f2d51f2"


def minio_record(
    bucket: str,
    key: str,
    event: str = "s3:ObjectCreated:Put",
    *,
    etag: str = MINIO_ETAG,
    size: int = 6474,
    content_type: str | None = "image/jpeg",
    event_time: str = "2019-09-10T17:41:54.000Z",
    endpoint: str = "http://10.0.0.2:9000",
    deployment_id: str | None = None,
    user_agent: str = "MinIO (linux; amd64) minio-go/v7.0.70",
    **obj: Any,
) -> dict[str, Any]:
    """A MinIO record (MinIO's docs/bucket/notifications/README.md): ``key`` as MinIO writes it (Go QueryEscape),
    ``eventName`` with ``s3:``; ``obj`` fields go into ``s3.object``."""
    fields: dict[str, Any] = {"key": key, "size": size, "eTag": etag, "sequencer": "15C32494527B46C5", **obj}
    if content_type is not None:
        fields |= {"contentType": content_type, "userMetadata": {"content-type": content_type}}
    response = {"x-amz-request-id": "15C3249451E12784"}
    if deployment_id is not None:
        response["x-minio-deployment-id"] = deployment_id
    response["x-minio-origin-endpoint"] = endpoint
    return {
        "eventVersion": "2.0",
        "eventSource": "minio:s3",
        "awsRegion": "",
        "eventTime": event_time,
        "eventName": event,
        "userIdentity": {"principalId": "AKIAIOSFODNN7EXAMPLE"},
        "requestParameters": {"accessKey": "AKIAIOSFODNN7EXAMPLE", "region": "", "sourceIPAddress": "192.168.56.192"},
        "responseElements": response,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "Config",
            "bucket": {
                "name": bucket,
                "ownerIdentity": {"principalId": "AKIAIOSFODNN7EXAMPLE"},
                "arn": f"arn:aws:s3:::{bucket}",
            },
            "object": fields,
        },
        "source": {"host": "192.168.56.192", "port": "", "userAgent": user_agent},
    }


def minio_log(*records: dict[str, Any]) -> dict[str, Any]:
    """MinIO's Kafka/webhook body, its event.Log: the redundant top-level EventName and Key (``bucket/decoded key``)
    around the records."""
    first = records[0]
    key = f"{first['s3']['bucket']['name']}/{unquote_plus(first['s3']['object'].get('key', ''))}"
    return {"EventName": first["eventName"], "Key": key, "Records": list(records)}


def ceph_record(
    bucket: str, key: str, *, request_id2: str | None = None, bucket_id: str | None = None, **obj: Any
) -> dict[str, Any]:
    """A Ceph RGW record (Ceph's doc/radosgw/notifications.rst): the key RAW, the size a string, ``etag`` lowercase,
    ``versionId`` "" when unversioned; ``obj`` fields go into ``s3.object`` (``None`` removes one)."""
    fields = {"key": key, "size": "1024", "etag": CEPH_ETAG, "versionId": "", "sequencer": "F7E6D75DC742D108",
              "metadata": [], "tags": [], **obj}  # fmt: skip
    response = {"x-amz-request-id": "503a4c37-85eb-47cd-8681-2817e80b4281.5330.903595"}
    if request_id2 is not None:
        response["x-amz-id-2"] = request_id2
    bucket_fields: dict[str, Any] = {
        "name": bucket,
        "ownerIdentity": {"principalId": "tester"},
        "arn": f"arn:aws:s3:zonegroup1::{bucket}",
    }
    if bucket_id is not None:
        bucket_fields["id"] = bucket_id
    return {
        "eventVersion": "2.1",
        "eventSource": "ceph:s3",
        "awsRegion": "zonegroup1",
        "eventTime": "2019-11-22T13:47:35.124724Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "tester"},
        "requestParameters": {"sourceIPAddress": ""},
        "responseElements": response,
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "mynotif1",
            "bucket": bucket_fields,
            "object": {k: v for k, v in fields.items() if v is not None},
        },
        "eventId": "",
        "opaqueData": "me@example.com",
    }
