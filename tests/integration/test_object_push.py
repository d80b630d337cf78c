"""Pushed object notifications, end to end on real servers: MinIO, Ceph, AWS and SNS bodies posted to the api
role's webhooks, and MinIO/Ceph records read from Kafka by a ``format: s3`` trigger, each becoming one task of the
``echo`` function (whose Success record carries the decoded ObjectEvent) or a dead letter.

One ``gpufleet run`` serves every test that needs a fleet: each uses its own bucket, so their tasks never meet.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import socket
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import orjson
import pytest

from gpufleet.aws import ObjectEvent
from gpufleet.dev.services import free_port
from tests.harness import FleetHarness
from tests.s3samples import MINIO_ETAG, ceph_record, minio_log, minio_record
from tests.snsutil import ConfirmEndpoint, TestCA, make_ca
from tests.unit.test_object_push import API_TOKEN, HOOK_TOKEN, SNS_TOKEN

HMAC_SECRET = "Igc2KhUbGdER_hKF2yvOwJ60Nv1Ek4A99KdWEBx_Onw"

SIGNED_MAX_BYTES = 1024  # the signed trigger's own max_payload_bytes; the fleet's default is 4096

ETAG = MINIO_ETAG  # what minio_record sends by default

TOPIC_ARN = "arn:aws:sns:us-east-1:123456789012:gpufleet-uploads"


def counts(published: int = 0, duplicates: int = 0, dead_lettered: int = 0, ignored: int = 0) -> dict[str, int]:
    return {"published": published, "duplicates": duplicates, "dead_lettered": dead_lettered, "ignored": ignored}


def new_bucket() -> str:
    return f"bkt-{uuid.uuid4().hex[:10]}"


def minio_message(*records: dict[str, Any]) -> bytes:
    """MinIO's event.Log around the records, as the bytes it posts."""
    return orjson.dumps(minio_log(*records))


def aws_record(bucket: str, key: str, content_type: str) -> dict[str, Any]:
    """An AWS record (``eventName`` without ``s3:``, key URL-encoded with ``+`` for a space). AWS sends no
    contentType: it is added so that the worker has no object to HEAD (these tests run without S3)."""
    return {
        "eventVersion": "2.1",
        "eventSource": "aws:s3",
        "awsRegion": "us-east-1",
        "eventTime": "2026-11-23T00:16:06.935Z",
        "eventName": "ObjectCreated:Put",
        "userIdentity": {"principalId": "AIDAJDPLRKLG7UEXAMPLE"},
        "s3": {
            "s3SchemaVersion": "1.0",
            "configurationId": "gpufleet",
            "bucket": {"name": bucket, "arn": f"arn:aws:s3:::{bucket}"},
            "object": {
                "key": key,
                "size": 77,
                "eTag": "d41d8cd98f00b204e9800998ecf8427e",
                "sequencer": "0055AED6DCD90281E5",
                "contentType": content_type,
            },
        },
    }


def s3_test_event(bucket: str) -> dict[str, Any]:
    return {"Service": "Amazon S3", "Event": "s3:TestEvent", "Time": "2026-11-23T00:16:06.749Z", "Bucket": bucket,
            "RequestId": "5582815E1AEA5ADF", "HostId": "8cLeGAmw098X5cv4Zkwcmo8vvZa3eH3eKxsPzbB9wrR"}  # fmt: skip


def sns_envelope(type_: str, **fields: Any) -> bytes:
    """An SNS HTTP(S) delivery (signature fields present but, as everywhere offline, not checked)."""
    body = {
        "Type": type_,
        "MessageId": str(uuid.uuid4()),
        "TopicArn": TOPIC_ARN,
        "Timestamp": "2026-11-23T00:16:07Z",
        "SignatureVersion": "1",
        "Signature": "RXhhbXBsZQ==",
        "SigningCertURL": "https://sns.us-east-1.amazonaws.com/SimpleNotificationService-0000.pem",
        **fields,
    }
    return orjson.dumps(body)  # fmt: skip


def sns_notification(message: dict[str, Any]) -> bytes:
    unsubscribe = f"https://sns.us-east-1.amazonaws.com/?Action=Unsubscribe&SubscriptionArn={TOPIC_ARN}:1"
    return sns_envelope("Notification", Subject="Amazon S3 Notification", Message=orjson.dumps(message).decode(),
                        UnsubscribeURL=unsubscribe)  # fmt: skip


def sns_confirmation(subscribe_url: str, type_: str = "SubscriptionConfirmation") -> bytes:
    return sns_envelope(type_, Token="2336412f37fb687f5d51e6e2425c464de", SubscribeURL=subscribe_url,
                        Message=f"You have chosen to subscribe to the topic {TOPIC_ARN}.")  # fmt: skip


def signature(body: bytes, secret: str = HMAC_SECRET, stamp: str | None = None) -> str:
    signed = body if stamp is None else stamp.encode() + b"." + body
    return "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signed(body: bytes, secret: str = HMAC_SECRET) -> dict[str, str]:
    """A sender's headers: the signature of ``<now>.<body>``, and now."""
    stamp = str(int(time.time()))
    return {"X-Gpufleet-Signature": signature(body, secret, stamp), "X-Gpufleet-Timestamp": stamp}


@dataclass
class Hooks:
    """A running fleet with five webhook triggers and one Kafka ``format: s3`` trigger."""

    harness: FleetHarness
    client: httpx.Client

    def post(self, path: str, body: bytes | Any, token: str | None = HOOK_TOKEN, **headers: str) -> httpx.Response:
        sent = {"Content-Type": "application/json", **({"Authorization": f"Bearer {token}"} if token else {}),
                **{k.replace("_", "-"): v for k, v in headers.items()}}  # fmt: skip
        return self.client.post(f"/v1/webhooks/{path}", content=body, headers=sent)

    def accepted(self, path: str, body: bytes, expected: dict[str, int], **kw: Any) -> None:
        r = self.post(path, body, **kw)
        assert r.status_code == 200, r.text
        assert r.json() == expected, r.text

    def refused(self, path: str, body: bytes, reason: str, **kw: Any) -> None:
        """Dead-lettered: 422 with the reason, never a 5xx the sender would retry in a loop."""
        r = self.post(path, body, **kw)
        assert r.status_code == 422, r.text
        assert r.json()["error"]["code"] == reason and r.json()["dead_lettered"] == 1, r.text

    def total_tasks(self) -> int:
        return sum(self.harness.registry.counts("echo").values())

    def callbacks(self, topic: str, ids: set[str], timeout_s: float = 60) -> dict[str, list[dict[str, Any]]]:
        """The records of ``topic`` keyed by one of ``ids``, once each id has one."""

        def found() -> dict[str, list[dict[str, Any]]] | None:
            by_id: dict[str, list[dict[str, Any]]] = {}
            for rec in self.harness.records(topic, 0, timeout_s=5):
                if rec["key"] in ids:
                    by_id.setdefault(rec["key"], []).append(rec)
            return by_id if set(by_id) == ids else None

        result: dict[str, list[dict[str, Any]]] = self.harness.wait_for(found, timeout_s, what=f"{ids} on {topic}")
        return result

    def echoed(self, ids: set[str]) -> dict[str, dict[str, Any]]:
        """The ObjectEvent each task's single Success record echoes, by task id; each task ran exactly once."""
        out = {}
        for task_id, recs in self.callbacks("success", ids).items():
            assert [r["headers"]["condition"] for r in recs] == ["Success"], recs
            assert recs[0]["value"]["responsePayload"]["attempt"] == 1
            assert self.harness.runs(task_id) == 1
            out[task_id] = recs[0]["value"]["responsePayload"]["echo"]
        return out

    def dead_letters(self, trigger: str, at_least: int) -> list[dict[str, Any]]:
        def found() -> list[dict[str, Any]] | None:
            recs = [r for r in self.harness.records("dlq", 0, timeout_s=5) if r["headers"].get("trigger") == trigger]
            return recs if len(recs) >= at_least else None

        recs: list[dict[str, Any]] = self.harness.wait_for(found, 60, what=f"{at_least} dead letters of {trigger}")
        return recs


def task_id(bucket: str, key: str, etag: str = ETAG, event_type: str = "ObjectCreated:Put") -> str:
    return ObjectEvent(bucket=bucket, key=key, event_type=event_type, etag=etag).task_id("echo")


class _TrustingHarness(FleetHarness):
    """A fleet whose api role trusts the test CA of the SubscribeURL stand-in (OpenSSL reads SSL_CERT_FILE)."""

    def __init__(self, services: Any, tmp_path: Path, ca: TestCA) -> None:
        self.ca = ca
        super().__init__(services, tmp_path)

    def env(self) -> dict[str, str]:
        return {**super().env(), "SSL_CERT_FILE": str(self.ca.ca_file)}


@pytest.fixture(scope="module")
def sns_ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("sns-ca"))


@pytest.fixture(scope="module")
def hooks(services: Any, sns_ca: TestCA, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hooks]:
    harness = _TrustingHarness(services, tmp_path_factory.mktemp("object-push"), sns_ca)
    port = free_port()
    webhook = {"function": "echo"}
    harness.write_config(
        triggers={
            "minio": {**webhook, "source": "webhook:///minio", "token": HOOK_TOKEN},
            "sns": {
                **webhook,
                "source": "webhook:///aws/sns",
                "token": SNS_TOKEN,
                "sns_confirm_hosts": ["127.0.0.1", "localhost", "*.invalid"],
                "sns_confirm_private": True,  # the stand-in for SNS is on 127.0.0.1
            },
            "sns-strict": {
                **webhook,
                "source": "webhook:///aws/sns-strict",
                "token": SNS_TOKEN,
                "sns_confirm_hosts": ["127.0.0.1", "localhost"],
            },
            "signed": {
                **webhook,
                "source": "webhook:///signed",
                "hmac_secret": HMAC_SECRET,
                "max_payload_bytes": SIGNED_MAX_BYTES,
            },
            "filtered": {
                **webhook,
                "source": "webhook:///filtered",
                "token": HOOK_TOKEN,
                "events": ["ObjectCreated:*"],
                "prefix": "in/",
                "suffix": ".jpg",
            },
            "objects": {"source": f"kafka:///{harness.topic('objects')}", "format": "s3", "function": "echo"},
        },
        api={"enabled": True, "port": port, "token": API_TOKEN},
    )
    harness.start()
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            harness.wait_api(client)
            yield Hooks(harness, client)
            assert harness.proc is not None and harness.proc.poll() is None, harness.log_text()[-4000:]
    finally:
        harness.stop()


def test_a_minio_put_runs_once_with_its_key_decoded(hooks: Hooks) -> None:
    bucket = new_bucket()
    body = minio_message(minio_record(bucket, "photos%2Fa+b%2B1.jpg"))
    hooks.accepted("minio", body, counts(published=1))
    # MinIO retries a delivery it saw fail: the same object is not run twice.
    hooks.accepted("minio", body, counts(duplicates=1))
    unicode_key = "fotos/été 2024/😀 (1).png"
    escaped = "fotos%2F%C3%A9t%C3%A9+2024%2F%F0%9F%98%80+%281%29.png"  # Go's url.QueryEscape
    hooks.accepted("minio", minio_message(minio_record(bucket, escaped, content_type="image/png")), counts(published=1))

    first, second = task_id(bucket, "photos/a b+1.jpg"), task_id(bucket, unicode_key)
    echoed = hooks.echoed({first, second})
    assert echoed[first] == {
        "bucket": bucket, "key": "photos/a b+1.jpg", "event_type": "ObjectCreated:Put", "size": 6474, "etag": ETAG,
        "version_id": None, "sequencer": "15C32494527B46C5", "event_time": "2019-09-10T17:41:54.000Z",
        "content_type": "image/jpeg", "source": "minio:s3", "region": None,
    }  # fmt: skip
    assert echoed[second]["key"] == unicode_key and echoed[second]["content_type"] == "image/png"
    record = hooks.harness.registry.get(first)
    assert record is not None and record["state"] == "SUCCEEDED" and record["attempts"] == 1
    assert record["source"].startswith("webhook:minio/")


def test_one_upload_announced_twice_is_one_task(hooks: Hooks) -> None:
    """MinIO and moto send Put and CompleteMultipartUpload for one multipart upload: same bucket, key and eTag."""
    bucket, etag = new_bucket(), "9b2cf535f27731c974343645a3985328-2"
    put = minio_record(bucket, "video%2Fone.mp4", etag=etag, content_type="video/mp4")
    complete = minio_record(bucket, "video%2Fone.mp4", "s3:ObjectCreated:CompleteMultipartUpload", etag=etag,
                            content_type="video/mp4")  # fmt: skip
    hooks.accepted("minio", minio_message(put, complete), counts(published=1, duplicates=1))
    put2 = minio_record(bucket, "video%2Ftwo.mp4", etag=etag, content_type="video/mp4")
    complete2 = minio_record(bucket, "video%2Ftwo.mp4", "s3:ObjectCreated:CompleteMultipartUpload", etag=etag,
                             content_type="video/mp4")  # fmt: skip
    hooks.accepted("minio", minio_message(put2), counts(published=1))
    hooks.accepted("minio", minio_message(complete2), counts(duplicates=1))

    one, two = task_id(bucket, "video/one.mp4", etag), task_id(bucket, "video/two.mp4", etag)
    echoed = hooks.echoed({one, two})
    assert echoed[one]["event_type"] == echoed[two]["event_type"] == "ObjectCreated:Put"  # the first one kept


def test_concurrent_deliveries_are_each_published_once(hooks: Hooks) -> None:
    """MinIO delivers from many goroutines at once: requests share the trigger's publisher and dead-letter
    producer."""
    bucket = new_bucket()
    fresh = [minio_message(minio_record(bucket, f"many%2F{i}.jpg")) for i in range(16)]
    repeated = [minio_message(minio_record(bucket, "many%2Fsame.jpg"))] * 4
    broken = [b"{" + f"broken {i} {bucket}".encode() for i in range(4)]
    with ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda body: hooks.post("minio", body), fresh + repeated + broken))
    assert [r.status_code for r in answers] == [200] * 20 + [422] * 4, [r.text for r in answers if r.status_code >= 300]
    total = {k: sum(r.json()[k] for r in answers) for k in counts()}
    assert total == counts(published=17, duplicates=3, dead_lettered=4)
    ids = {task_id(bucket, f"many/{i}.jpg") for i in range(16)} | {task_id(bucket, "many/same.jpg")}
    assert len(hooks.echoed(ids)) == 17
    letters = [r for r in hooks.dead_letters("minio", 4) if bucket.encode() in r["raw"]]
    assert sorted(r["raw"] for r in letters) == sorted(broken)


def test_sns_notifications_over_http_basic(hooks: Hooks) -> None:
    bucket = new_bucket()
    basic = "Basic " + base64.b64encode(f"gpufleet:{SNS_TOKEN}".encode()).decode()
    note = sns_notification({"Records": [aws_record(bucket, "reports/q1+2024%2Bfinal.csv", "text/csv")]})
    r = hooks.post("aws/sns", note, token=None, Authorization=basic, Content_Type="text/plain; charset=UTF-8")
    assert r.status_code == 200 and r.json() == counts(published=1), r.text
    # The bearer form works too, and the same notification delivered again is a duplicate.
    hooks.accepted("aws/sns", note, counts(duplicates=1), token=SNS_TOKEN, Content_Type="text/plain; charset=UTF-8")

    test = sns_notification(s3_test_event(bucket))
    before = hooks.total_tasks()
    r = hooks.post("aws/sns", test, token=None, Authorization=basic, Content_Type="text/plain; charset=UTF-8")
    assert r.status_code == 200 and r.json() == counts(ignored=1), r.text
    unsubscribed = sns_confirmation("https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription",
                                    "UnsubscribeConfirmation")  # fmt: skip
    hooks.accepted("aws/sns", unsubscribed, {"ignored": 1}, token=SNS_TOKEN)
    assert hooks.total_tasks() == before

    tid = ObjectEvent(bucket=bucket, key="reports/q1 2024+final.csv", event_type="ObjectCreated:Put",
                      etag="d41d8cd98f00b204e9800998ecf8427e").task_id("echo")  # fmt: skip
    event = hooks.echoed({tid})[tid]
    assert event["key"] == "reports/q1 2024+final.csv" and event["source"] == "aws:s3"
    assert event["region"] == "us-east-1" and event["size"] == 77
    test_id = orjson.loads(test)["MessageId"]
    assert not [r for r in hooks.harness.records("dlq", 0, timeout_s=5) if r["key"] == f"webhook:aws/sns/{test_id}"]


def test_sns_subscription_is_confirmed_only_on_an_allowed_host(hooks: Hooks, sns_ca: TestCA) -> None:
    with ConfirmEndpoint(sns_ca) as sns:
        url = f"https://127.0.0.1:{sns.port}/?Action=ConfirmSubscription&TopicArn={TOPIC_ARN}&Token=2336412f"
        body = sns_confirmation(url)
        # Without credentials nothing is fetched.
        r = hooks.post("aws/sns", body, token=None, Content_Type="text/plain; charset=UTF-8")
        assert r.status_code == 401 and sns.paths == []
        r = hooks.post("aws/sns", body, token=SNS_TOKEN, Content_Type="text/plain; charset=UTF-8")
        assert r.status_code == 200 and r.json() == {"confirmed": True}, r.text
        assert sns.paths == [url.removeprefix(f"https://127.0.0.1:{sns.port}")]
        # By name: the certificate is checked for "localhost" (sent as SNI) at the address the name resolved to.
        r = hooks.post("aws/sns", sns_confirmation(f"https://LocalHost:{sns.port}/by-name"), token=SNS_TOKEN)
        assert r.status_code == 200 and r.json() == {"confirmed": True}, r.text
        assert sns.paths[-1] == "/by-name" and sns.sni[-1] == "localhost"
        fetched = list(sns.paths)

        # The minio trigger allows only AWS's SNS hosts (the default), and sns-strict no IP literal or private
        # address: the same confirmation is refused, and nothing is fetched.
        answers = {"minio": hooks.post("minio", body)}
        for strict in (url, f"https://localhost:{sns.port}/"):
            answers[f"sns-strict {strict}"] = hooks.post("aws/sns-strict", sns_confirmation(strict), token=SNS_TOKEN)
        secret = "Token=Zm9yZ2VkLXRva2VuLXZhbHVl"
        for refused in (f"http://127.0.0.1:{sns.port}/?{secret}", f"https://localhost.evil.invalid:{sns.port}/",
                        f"https://127.0.0.1.nip.io:{sns.port}/", f"https://localhostXX:{sns.port}/",
                        f"https://xlocalhost:{sns.port}/", f"ftp://127.0.0.1:{sns.port}/", "file:///etc/passwd",
                        "not a url", "", "https://[::1", "https://a:b:c/", "https://sns.us-east-1.amazonaws.com:99999/",
                        f"https://127.0.0.1:{sns.port}/\r\nX-Injected: 1", f"https://127.0.0.1:{sns.port}/\x00?{secret}",
                        f"https://127.0.0.1:{sns.port}/ok\x7f", f"https://127.0.0.1:{sns.port}/\u00e9",
                        f"https://user:pw@127.0.0.1:{sns.port}/"):  # fmt: skip
            answers[refused] = hooks.post("aws/sns", sns_confirmation(refused), token=SNS_TOKEN)
        assert sns.paths == fetched

        # An allowed host that refuses, redirects elsewhere, answers 403 or has no address.
        with socket.socket() as closed:
            closed.bind(("127.0.0.1", 0))
            for failing in (f"https://127.0.0.1:{sns.port}/denied?{secret}", f"https://127.0.0.1:{sns.port}/redirect",
                            f"https://127.0.0.1:{closed.getsockname()[1]}/?{secret}",
                            f"https://nowhere.invalid:{sns.port}/?{secret}"):  # fmt: skip
                answers[failing] = hooks.post("aws/sns", sns_confirmation(failing), token=SNS_TOKEN)
        assert sns.paths == [*fetched, f"/denied?{secret}", "/redirect"]  # the redirect was not followed

    # Whatever the cause, the sender gets the same 502 (which it may retry), never a 500: a forged confirmation
    # cannot tell an open port from a closed one or a missing name. The log says which, without the token.
    first = answers["minio"]
    assert first.status_code == 502 and first.json()["error"]["code"] == "sns_confirm_failed", first.text
    different = {k: (r.status_code, r.text) for k, r in answers.items()
                 if (r.status_code, r.content) != (502, first.content)}  # fmt: skip
    assert not different, different
    log = hooks.harness.log_text()
    for cause in ("is not allowed by sns_confirm_hosts", "is an IP address", "not a public address", "HTTP 403",
                  "HTTP 302", "cannot connect", "cannot resolve", "scheme is 'http'"):  # fmt: skip
        assert cause in log, cause
    assert "Zm9yZ2VkLXRva2VuLXZhbHVl" not in log


def test_an_sns_answer_is_read_up_to_a_cap(hooks: Hooks, sns_ca: TestCA) -> None:
    with ConfirmEndpoint(sns_ca) as sns:
        r = hooks.post("aws/sns", sns_confirmation(f"https://localhost:{sns.port}/huge"), token=SNS_TOKEN)
        assert r.status_code == 200 and r.json() == {"confirmed": True}, r.text
        assert sns.huge_done.wait(30) and sns.huge_complete is False  # the api hung up long before its end


def test_webhooks_refuse_missing_or_wrong_credentials_and_enqueue_nothing(hooks: Hooks) -> None:
    bucket = new_bucket()
    body = minio_message(minio_record(bucket, "auth%2Fx.jpg"))
    tid = task_id(bucket, "auth/x.jpg")
    before = hooks.total_tasks()
    wrong_basic = "Basic " + base64.b64encode(f"gpufleet:{HOOK_TOKEN}x".encode()).decode()
    refused: list[tuple[str, dict[str, str]]] = [
        ("minio", {}),
        ("minio", {"Authorization": f"Bearer {HOOK_TOKEN}x"}),
        ("minio", {"Authorization": f"Bearer {SNS_TOKEN}"}),  # another trigger's token
        ("minio", {"Authorization": f"Bearer {API_TOKEN}"}),  # the API's token is not a webhook's
        ("minio", {"Authorization": HOOK_TOKEN}),
        ("minio", {"Authorization": wrong_basic}),
        ("minio", {"Authorization": "Basic !!not-base64!!"}),
        ("minio", signed(body)),  # the minio trigger has no hmac_secret
        ("signed", {"Authorization": f"Bearer {HOOK_TOKEN}"}),  # the signed trigger has no token
        ("signed", {}),
        ("signed", signed(body, HMAC_SECRET + "x")),
        ("signed", signed(body + b" ")),
        ("signed", {"X-Gpufleet-Signature": signature(body)}),  # no timestamp: a replay could never be told
        ("signed", {**signed(body), "X-Gpufleet-Timestamp": "1"}),
        ("signed", {k: v.removeprefix("sha256=") for k, v in signed(body).items()}),
        ("signed", {k: v.upper() for k, v in signed(body).items()}),
    ]
    for path, headers in refused:
        r = hooks.client.post(f"/v1/webhooks/{path}", content=body, headers=headers)
        assert r.status_code == 401, (path, headers, r.text)
        assert r.json()["error"]["code"] == "unauthorized"
        assert r.headers["www-authenticate"] == 'Bearer, Basic realm="gpufleet"'
    assert hooks.harness.registry.get(tid) is None
    assert hooks.total_tasks() == before
    # A path no trigger serves answers the same 401, whatever the credentials: names cannot be enumerated.
    r = hooks.post("nope", body)
    assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized", r.text

    # Nothing was enqueued above: the first accepted delivery is new, not a duplicate.
    hooks.accepted("signed", body, counts(published=1), token=None, **signed(body))
    other = minio_message(minio_record(bucket, "auth%2Fy.jpg"))
    hooks.accepted("minio", other, counts(published=1), token=None,
                   Authorization="Basic " + base64.b64encode(f"minio:{HOOK_TOKEN}".encode()).decode())  # fmt: skip
    echoed = hooks.echoed({tid, task_id(bucket, "auth/y.jpg")})
    assert echoed[tid]["key"] == "auth/x.jpg"
    assert hooks.harness.registry.get(tid)["source"].startswith("webhook:signed/")  # type: ignore[index]


def test_bodies_over_max_payload_bytes_are_413(hooks: Hooks) -> None:
    bucket = new_bucket()
    before = hooks.total_tasks()
    huge = minio_message(minio_record(bucket, "big.jpg", padding="x" * 4096))
    for path, headers in (("minio", {}), ("signed", signed(huge))):
        r = hooks.post(path, huge, token=HOOK_TOKEN if path == "minio" else None, **headers)
        assert r.status_code == 413 and r.json()["error"]["code"] == "payload_too_large", r.text
    # Chunked: no Content-Length to go by.
    r = hooks.client.post("/v1/webhooks/minio", content=iter([huge[:3000], huge[3000:]]),
                          headers={"Authorization": f"Bearer {HOOK_TOKEN}"})  # fmt: skip
    assert "content-length" not in r.request.headers
    assert r.status_code == 413, r.text
    # The signed trigger's own max_payload_bytes (1024) is below the fleet's (4096).
    mid = minio_message(minio_record(bucket, "mid.jpg", padding="x" * 1200))
    assert SIGNED_MAX_BYTES < len(mid) < 4096
    r = hooks.post("signed", mid, token=None, **signed(mid))
    assert r.status_code == 413 and f"{SIGNED_MAX_BYTES} bytes" in r.json()["error"]["message"], r.text
    assert hooks.total_tasks() == before
    hooks.accepted("minio", mid, counts(published=1))
    assert hooks.echoed({task_id(bucket, "mid.jpg")})


def test_malformed_bodies_are_dead_lettered_with_their_reason(hooks: Hooks) -> None:
    bucket = new_bucket()
    no_key = minio_record(bucket, "x")
    del no_key["s3"]["object"]["key"]
    bad = {
        b'{"EventName": "s3:ObjectCreated:Put", "Records": [' + bucket.encode(): "malformed_json",
        orjson.dumps({"hello": bucket}): "not_s3_event",
        minio_message(no_key): "bad_record",
    }
    before = hooks.total_tasks()
    for body, reason in bad.items():
        hooks.refused("minio", body, reason)
    # One bad record dead-letters the whole message: its good one does not run either.
    mixed = orjson.dumps({"Records": [minio_record(bucket, "good.jpg"), no_key]})
    hooks.refused("minio", mixed, "bad_record")
    bad[mixed] = "bad_record"
    assert hooks.total_tasks() == before

    letters = {r["raw"]: r for r in hooks.dead_letters("minio", len(bad)) if bucket.encode() in r["raw"]}
    assert set(letters) == set(bad)
    for body, reason in bad.items():
        headers = letters[body]["headers"]
        assert headers["reason"] == reason, headers
        assert headers["source"].startswith("webhook:minio/") and headers["source"] == letters[body]["key"]
        assert headers["detail"]
    assert "record 1" in letters[mixed]["headers"]["detail"]


def test_filters_ignore_what_the_trigger_does_not_want(hooks: Hooks) -> None:
    bucket = new_bucket()
    unwanted = [
        minio_record(bucket, "in%2Fgone.jpg", "s3:ObjectRemoved:Delete"),
        minio_record(bucket, "out%2Fphoto.jpg"),  # prefix
        minio_record(bucket, "in%2Fphoto.png"),  # suffix
        minio_record(bucket, "in%2Fphoto.jpg", "s3:ObjectCreated:PutTagging"),  # no new content
        minio_record(bucket, "in%2Fphoto.jpg", "s3:ObjectAccessed:Get"),
    ]
    before = hooks.total_tasks()
    for record in unwanted:
        hooks.accepted("filtered", minio_message(record), counts(ignored=1))
    assert hooks.total_tasks() == before
    # Filters see the decoded key ("in/a photo.jpg"); one wanted record among unwanted ones is published.
    wanted = minio_record(bucket, "in%2Fa+photo.jpg")
    hooks.accepted("filtered", minio_message(unwanted[0], wanted, unwanted[1]), counts(published=1))
    tid = task_id(bucket, "in/a photo.jpg")
    assert hooks.echoed({tid})[tid]["key"] == "in/a photo.jpg"
    assert hooks.total_tasks() == before + 1


def test_a_record_without_content_type_fails_its_task_cleanly_without_s3(hooks: Hooks) -> None:
    """The worker HEADs the object for its content type; with no S3 server configured that fails the task after
    its retries, and the fleet goes on."""
    bucket = new_bucket()
    hooks.accepted("minio", minio_message(minio_record(bucket, "no-type.bin", content_type=None)), counts(published=1))
    tid = task_id(bucket, "no-type.bin")
    [failure] = hooks.callbacks("failure", {tid}, timeout_s=90)[tid]
    assert failure["headers"]["condition"] == "RetriesExhausted", failure
    error = failure["value"]["responsePayload"]
    assert error["errorType"] == "TaskError" and f"HEAD s3://{bucket}/no-type.bin" in error["errorMessage"], error
    assert hooks.harness.runs(tid) == 0  # the handler never ran
    record = hooks.harness.registry.get(tid)
    assert record is not None and record["state"] == "FAILED" and record["attempts"] == 3
    # Still serving.
    hooks.accepted("minio", minio_message(minio_record(bucket, "after.jpg")), counts(published=1))
    assert hooks.echoed({task_id(bucket, "after.jpg")})


def test_kafka_trigger_reads_minio_and_ceph_notifications(hooks: Hooks) -> None:
    bucket = new_bucket()
    two = minio_message(minio_record(bucket, "k%2Fone.txt", content_type="text/plain"),
                        minio_record(bucket, "k%2Ftwo%2B2.txt", content_type="text/plain"))  # fmt: skip
    ceph = orjson.dumps({"Records": [ceph_record(bucket, "raw/a+b %41.txt", contentType="text/plain")]})
    test = orjson.dumps(s3_test_event(bucket))
    malformed = orjson.dumps({"Records": [{"eventName": "s3:ObjectCreated:Put", "bucket": bucket}]})
    hooks.harness.produce("objects", [two, ceph, test, malformed])

    ids = {task_id(bucket, "k/one.txt"), task_id(bucket, "k/two+2.txt"),
           task_id(bucket, "raw/a+b %41.txt", "37b51d194a7513e45b56f6524f2d51f2")}  # fmt: skip
    echoed = hooks.echoed(ids)
    assert sorted(e["key"] for e in echoed.values()) == ["k/one.txt", "k/two+2.txt", "raw/a+b %41.txt"]
    ceph_event = next(e for e in echoed.values() if e["source"] == "ceph:s3")
    assert ceph_event["size"] == 1024 and ceph_event["version_id"] is None and ceph_event["region"] == "zonegroup1"

    [letter] = hooks.dead_letters("objects", 1)  # the TestEvent is acknowledged, not dead-lettered
    assert letter["raw"] == malformed and letter["headers"]["reason"] == "bad_record"
    assert letter["headers"]["source"].startswith(f"kafka:{hooks.harness.topic('objects')}/")
    for rec in hooks.harness.records("success", 0, timeout_s=5):
        assert rec["value"]["responsePayload"]["echo"]["bucket"] != bucket or rec["key"] in ids
