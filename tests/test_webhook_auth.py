"""Webhooks cost nothing unauthenticated, tell nothing about their names, and refuse replays (security review,
items 3 and 8), against a real ``gpufleet api`` process.

Before: every webhook read up to ``max_payload_bytes`` of body before it looked at the credentials (300 stalled
uploads of about 1 MiB took the api from 92 to 385 MiB), an unknown name was 404 where a wrong token was 401, and a
captured signed request could be replayed at any time.
"""

from __future__ import annotations

import hashlib
import hmac
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import orjson
import psutil
import pytest

from gpufleet.dev.services import free_port
from tests.harness import FleetHarness
from tests.test_object_push import aws_record

API_TOKEN = "Wq4Zt8Kp2Xm6Rv9Ln3Bc7Hd1Jf5Gs0Ya8Ue2Mk"
HOOK_TOKEN = "Hx3Lp7Rq1Vz5Nm9Kt2Wb6Jc4Yd8Gf0Sa3Ue7Qn"
SECRET = "Dk6Tm1Xq5Rz9Lv3Pb7Wn2Hc8Jy4Gf0Sa6Ue1Mk"
BODY_TIMEOUT_S = 2.0
MAX_CONNECTIONS = 12
HOOK_MAX_BYTES = 512 * 1024


class Api:
    def __init__(self, harness: FleetHarness, port: int) -> None:
        self.harness, self.port = harness, port
        self.client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

    def post(self, path: str, body: bytes, **headers: str) -> httpx.Response:
        return self.client.post(f"/v1/webhooks/{path}", content=body, headers=headers)

    def raw(self, head: str, body: bytes = b"", read_timeout_s: float = 10) -> tuple[int, bytes]:
        """Send a request head (and part of a body, or none) on a fresh connection; return the status and the
        whole answer, read until the server closes or ``read_timeout_s`` passes."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=read_timeout_s) as sock:
            sock.sendall(head.encode() + b"\r\n\r\n" + body)
            answer = b""
            try:
                while chunk := sock.recv(65536):
                    answer += chunk
                    if b"\r\n\r\n" in answer and _complete(answer):
                        break
            except (TimeoutError, ConnectionResetError):
                pass
        return int(answer.split(b" ", 2)[1]) if answer else 0, answer


def _complete(answer: bytes) -> bool:
    head, _, body = answer.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


@pytest.fixture(scope="module")
def api(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    harness = FleetHarness(services, tmp_path_factory.mktemp("webhook-auth"))
    port = free_port()
    hook = {"function": "echo", "max_payload_bytes": HOOK_MAX_BYTES}
    harness.write_config(
        triggers={
            "minio": {**hook, "source": "webhook:///minio", "token": HOOK_TOKEN},
            "signed": {**hook, "source": "webhook:///signed", "hmac_secret": SECRET, "hmac_tolerance_s": 60},
            "strict": {**hook, "source": "webhook:///strict", "hmac_secret": SECRET, "hmac_require_timestamp": True},
        },
        api={
            "enabled": True,
            "port": port,
            "token": API_TOKEN,
            "body_timeout_s": BODY_TIMEOUT_S,
            "max_connections": MAX_CONNECTIONS,
        },
    )
    harness.start("api")
    a = Api(harness, port)

    try:
        harness.wait_api(a.client)
        yield a
    finally:
        a.client.close()
        harness.stop()


def notification(key: str) -> bytes:
    return orjson.dumps({"Records": [aws_record("bucket", key, "image/jpeg")]})


def sign(body: bytes, stamp: str | None = None, secret: str = SECRET) -> dict[str, str]:
    signed = body if stamp is None else stamp.encode() + b"." + body
    headers = {"X-Gpufleet-Signature": "sha256=" + hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()}
    return headers | ({"X-Gpufleet-Timestamp": stamp} if stamp is not None else {})


def test_an_unknown_name_and_bad_credentials_get_the_same_401(api: Api) -> None:
    body = notification("same.jpg")
    answers = {
        "unknown, none": api.post("nope", body),
        "unknown, bearer": api.post("nope", body, Authorization=f"Bearer {HOOK_TOKEN}"),
        "unknown, signed": api.post("nope/deeper", body, **sign(body)),
        "known, none": api.post("minio", body),
        "known, wrong bearer": api.post("minio", body, Authorization=f"Bearer {HOOK_TOKEN}x"),
        "known, wrong basic": api.post("minio", body, Authorization="Basic Z3B1ZmxlZXQ6d3Jvbmc="),
        "known, bad signature": api.post("signed", body, **sign(body, secret=SECRET + "x")),
        "known, the token of another hook": api.post("signed", body, Authorization=f"Bearer {HOOK_TOKEN}"),
    }
    shapes = {(r.status_code, r.content, r.headers.get("www-authenticate")) for r in answers.values()}
    assert len(shapes) == 1, {name: (r.status_code, r.text) for name, r in answers.items()}
    status, content, _ = shapes.pop()
    assert status == 401 and orjson.loads(content)["error"]["code"] == "unauthorized"
    assert api.harness.registry.counts("echo").get("QUEUED", 0) == 0


def test_bearer_and_basic_are_checked_before_the_body_is_read(api: Api) -> None:
    # A head that announces 512 KiB and sends none of it: the answer comes at once, the body is never awaited.
    for path, auth in (("minio", f"Bearer {HOOK_TOKEN}x"), ("minio", ""), ("nope", f"Bearer {HOOK_TOKEN}")):
        head = f"POST /v1/webhooks/{path} HTTP/1.1\r\nHost: x\r\nContent-Length: {HOOK_MAX_BYTES}"
        status, answer = api.raw(
            head + (f"\r\nAuthorization: {auth}" if auth else ""), read_timeout_s=BODY_TIMEOUT_S / 2
        )
        assert status == 401, answer[:300]


def test_stalled_unauthenticated_uploads_cost_no_memory(api: Api) -> None:
    """The issue's probe: hundreds of uploads of about a MiB with a wrong token, all at once."""
    assert api.harness.proc is not None
    proc = psutil.Process(api.harness.proc.pid)
    before = proc.memory_info().rss
    body = b"x" * HOOK_MAX_BYTES
    head = (f"POST /v1/webhooks/minio HTTP/1.1\r\nHost: x\r\nContent-Length: {len(body)}\r\n"
            f"Authorization: Bearer {HOOK_TOKEN}x")  # fmt: skip

    def upload(_: int) -> int:
        try:
            return api.raw(head, body, read_timeout_s=20)[0]
        except (BrokenPipeError, ConnectionResetError):
            return 401  # answered and closed before the whole body was sent: what should happen

    with ThreadPoolExecutor(MAX_CONNECTIONS - 2) as pool:  # below max_connections: none is refused with 503
        statuses = list(pool.map(upload, range(300)))
    assert set(statuses) == {401}, statuses
    grown = (proc.memory_info().rss - before) / 2**20
    assert grown < 40, f"the api grew by {grown:.0f} MiB"


def test_a_body_that_stalls_is_answered_408(api: Api) -> None:
    head = (f"POST /v1/webhooks/minio HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            f"Authorization: Bearer {HOOK_TOKEN}")  # fmt: skip
    status, answer = api.raw(head, b'{"Records": ', read_timeout_s=BODY_TIMEOUT_S * 5)
    assert status == 408 and b"body_timeout" in answer, answer[:300]
    # The API's own routes too, once the token is right.
    head = (f"POST /v1/functions/echo/invocations HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n"
            f"Authorization: Bearer {API_TOKEN}")  # fmt: skip
    status, answer = api.raw(head, b"{", read_timeout_s=BODY_TIMEOUT_S * 5)
    assert status == 408, answer[:300]


def test_connections_beyond_max_connections_are_refused_at_once(api: Api) -> None:
    """Authenticated uploads whose bodies never come hold at most max_connections slots; the rest get 503 at
    once, and the slots come back after body_timeout_s."""
    head = (f"POST /v1/webhooks/minio HTTP/1.1\r\nHost: x\r\nContent-Length: 1000\r\n"
            f"Authorization: Bearer {HOOK_TOKEN}\r\n\r\n").encode()  # fmt: skip
    held: list[socket.socket] = []
    try:
        for _ in range(2 * MAX_CONNECTIONS):  # one after the other: uvicorn counts open connections
            held.append(socket.create_connection(("127.0.0.1", api.port)))
            held[-1].sendall(head)
            time.sleep(0.02)
        time.sleep(0.5)
        waiting = 0
        for sock in held:
            sock.setblocking(False)
            try:
                assert sock.recv(100).startswith(b"HTTP/1.1 503 ")
            except BlockingIOError:
                waiting += 1  # in the app, waiting for its body
        assert 0 < waiting <= MAX_CONNECTIONS
    finally:
        for sock in held:
            sock.close()
    api.harness.wait_for(lambda: api.client.get("/healthz").status_code == 200, 30, what="slots freed")


def test_a_signed_timestamp_stops_replays(api: Api) -> None:
    now = int(time.time())
    fresh = notification("fresh.jpg")
    assert api.post("signed", fresh, **sign(fresh, str(now))).json()["published"] == 1
    for name, headers in {
        "an hour old": sign(fresh, str(now - 3600)),
        "an hour ahead": sign(fresh, str(now + 3600)),
        "timestamp changed after signing": sign(fresh, str(now)) | {"X-Gpufleet-Timestamp": str(now + 1)},
        "not a number": sign(fresh, "12e3"),
        # Before: int() of more digits than Python reads raised, and the request got a 500 with a traceback logged.
        "5,000 digits": sign(fresh, "9" * 5000),
        "a signature of nothing, 5,000 digits": {"X-Gpufleet-Signature": "x", "X-Gpufleet-Timestamp": "9" * 5000},
    }.items():
        assert api.post("signed", fresh, **headers).status_code == 401, name
    # Without a timestamp: accepted where it is optional, refused where it is required.
    legacy, strict = notification("legacy.jpg"), notification("strict.jpg")
    assert api.post("signed", legacy, **sign(legacy)).json()["published"] == 1
    assert api.post("strict", strict, **sign(strict)).status_code == 401
    assert api.post("strict", strict, **sign(strict, str(now))).json()["published"] == 1
    # A replay inside the window names the same objects: a duplicate, never a second run.
    assert api.post("signed", fresh, **sign(fresh, str(now))).json() == {
        "published": 0, "duplicates": 1, "dead_lettered": 0, "ignored": 0}  # fmt: skip
