"""Confirming SNS subscriptions (gpufleet.triggers.sns_confirm): host patterns, address checks, and the guarded GET
against a local https stand-in. The same checks through the api role's webhook endpoint are in test_object_push.py."""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gpufleet.triggers.sns_confirm import (
    MAX_BODY_BYTES,
    SNS_HOSTS,
    SnsConfirmError,
    address_allowed,
    check_host_pattern,
    confirm_subscription,
    host_allowed,
    redact,
)
from tests.snsutil import ConfirmEndpoint, TestCA, make_ca

LOOPBACK = ("localhost", "127.0.0.1")


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> TestCA:
    return make_ca(tmp_path_factory.mktemp("sns-ca"))


@pytest.fixture
def sns(ca: TestCA) -> Iterator[ConfirmEndpoint]:
    with ConfirmEndpoint(ca) as endpoint:
        yield endpoint


def resolving_to(*addresses: str) -> Any:
    """A getaddrinfo that answers ``addresses`` for any name, and counts its calls."""
    calls: list[str] = []

    def getaddrinfo(host: str, port: int, *args: Any, **kwargs: Any) -> list[Any]:
        calls.append(host)
        return [
            (
                socket.AF_INET6 if ":" in a else socket.AF_INET,
                socket.SOCK_STREAM,
                6,
                "",
                (a, port, 0, 0) if ":" in a else (a, port),
            )
            for a in addresses
        ]

    getaddrinfo.calls = calls  # type: ignore[attr-defined]
    return getaddrinfo


# -- host patterns ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("host", "patterns"),
    [
        ("sns.us-east-1.amazonaws.com", SNS_HOSTS),
        ("SNS.EU-West-1.AmazonAWS.com", SNS_HOSTS),
        ("sns.cn-north-1.amazonaws.com.cn", SNS_HOSTS),
        ("localhost", ["localhost"]),
        ("LocalHost", ["LOCALHOST"]),
        ("127.0.0.1", ["127.0.0.1"]),
        ("::1", ["0:0::1"]),
        ("a.example.com", ["*.example.com"]),
    ],
)
def test_hosts_that_match_a_pattern_whole(host: str, patterns: list[str]) -> None:
    assert host_allowed(host, [check_host_pattern(p) for p in patterns])


@pytest.mark.parametrize(
    ("host", "patterns"),
    [
        # prefix matches, as re.match allowed them
        ("localhost.evil.invalid", ["localhost"]),
        ("localhostXX", ["localhost"]),
        ("127.0.0.1.nip.io", ["127.0.0.1"]),
        ("sns.us-east-1.amazonaws.com.evil.invalid", SNS_HOSTS),
        ("sns.us-east-1.amazonaws.comx", SNS_HOSTS),
        # suffix and label tricks
        ("xlocalhost", ["localhost"]),
        ("evil.localhost", ["localhost"]),
        ("evil-sns.us-east-1.amazonaws.com", SNS_HOSTS),
        ("sns.a.b.amazonaws.com", SNS_HOSTS),  # "*" is one label, never two
        ("sns..amazonaws.com", SNS_HOSTS),
        ("sns.us_east_1.amazonaws.com", SNS_HOSTS),
        ("sns.-x-.amazonaws.com", SNS_HOSTS),
        ("snsxus-east-1.amazonaws.com", SNS_HOSTS),  # the "." of a pattern is no regex wildcard
        ("sns.us-east-1.amazonaws.com.", SNS_HOSTS),
        ("", SNS_HOSTS),
        ("example.com", ["*.example.com"]),
        # addresses compare as addresses, never as names
        ("127.0.0.01", ["127.0.0.1"]),
        ("127.1", ["127.0.0.1"]),
        ("2130706433", ["127.0.0.1"]),
        ("::2", ["::1"]),
        ("127.0.0.1", ["localhost"]),
    ],
)
def test_hosts_that_do_not_match(host: str, patterns: list[str]) -> None:
    assert not host_allowed(host, [check_host_pattern(p) for p in patterns])


def test_patterns_are_checked_and_normalised() -> None:
    assert check_host_pattern("SNS.*.AmazonAWS.com") == "sns.*.amazonaws.com"
    assert check_host_pattern("127.0.0.1") == "127.0.0.1"
    for bad in (
        r"^sns\.[a-z0-9-]+\.amazonaws\.com(\.cn)?$",
        r"^127\.0\.0\.1$",
        "sns.[a-z]+.amazonaws.com",
        "*",
        "sns.*",
        "sns-*.amazonaws.com",
        "**.example.com",
        "",
        "a..b",
        "example.com.",
        "https://example.com",
        "example.com:443",
        "exa mple.com",
        "ex_ample.com",
        "-x.example.com",
    ):
        with pytest.raises(ValueError, match=r"sns\.\*\.amazonaws\.com") as err:
            check_host_pattern(bad)
        assert "regular expressions are not accepted" in str(err.value)


# -- addresses --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "address", ["8.8.8.8", "52.94.233.1", "2606:4700:4700::1111", "::ffff:8.8.8.8", "64:ff9b::808:808"]
)
def test_public_addresses_are_allowed(address: str) -> None:
    assert address_allowed(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.0.0.1",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "100.64.0.1",
        "0.0.0.0",
        "192.0.2.1",
        "198.18.0.1",
        "224.0.0.1",
        "233.252.0.1",
        "240.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd00:ec2::254",
        "ff02::1",
        "ff0e::1",
        "2001:db8::1",
        "::ffff:127.0.0.1",
        "::ffff:169.254.169.254",
        "::127.0.0.1",
        "64:ff9b::a9fe:a9fe",
        "2002:7f00:1::",
        "2001:0:4136:e378:8000:63bf:3fff:fdd2",
    ],
)
def test_private_and_special_addresses_are_refused(address: str) -> None:
    assert not address_allowed(ipaddress.ip_address(address))


# -- URLs refused before any connection -------------------------------------------------------------------------

MALFORMED = [
    "https://[::1",
    "https://a:b:c/",
    "https://sns.us-east-1.amazonaws.com:99999/",
    "https://sns.us-east-1.amazonaws.com:-1/",
    "https://sns.us-east-1.amazonaws.com:0/",
    "https://sns.us-east-1.amazonaws.com:x/",
    "https://sns.us-east-1.amazonaws.com/\r\nX-Injected: 1",
    "https://sns.us-east-1.amazonaws.com/\x00",
    "https://sns.us-east-1.amazonaws.com/\x7f",
    "https://sns.us-east-1.amazonaws.com/ a",
    "https://sns.us-east-1.amazonaws.com\u0430/",
    "https://sns.us-east-1.amazonaws.com/?x=\u00e9",
    "https://user:pw@sns.us-east-1.amazonaws.com/",
    "https://sns.us-east-1.amazonaws.com@evil.invalid/",
    "http://sns.us-east-1.amazonaws.com/",
    "HTTP://sns.us-east-1.amazonaws.com/",
    "ftp://sns.us-east-1.amazonaws.com/",
    "file:///etc/passwd",
    "//sns.us-east-1.amazonaws.com/",
    "sns.us-east-1.amazonaws.com/",
    "https://",
    "https:///?Action=ConfirmSubscription",
    "https://8.8.8.8/",
    "https://[2606:4700:4700::1111]/",
    "https://sns.us-east-1.amazonaws.com.evil.invalid/",
    "https://sns.us-east-1.amazonaws.com/" + "a" * 5000,
    "",
    "not a url",
]


@pytest.mark.parametrize("url", MALFORMED)
def test_bad_urls_fail_with_the_one_error(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    lookups = resolving_to("8.8.8.8")
    monkeypatch.setattr(socket, "getaddrinfo", lookups)
    with pytest.raises(SnsConfirmError):
        confirm_subscription(url, SNS_HOSTS, allow_private=False)
    assert lookups.calls == []  # refused before any lookup


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.one_of(
        st.text(),
        st.text().map(lambda s: "https://" + s),
        st.text().map(lambda s: f"https://{s}/?x=1"),
        st.text().map(lambda s: f"https://sns.us-east-1.amazonaws.com:{s}/"),
    )
)
def test_any_url_fails_with_the_one_error(url: str) -> None:
    with pytest.raises(SnsConfirmError):
        confirm_subscription(url, ["nothing.invalid"], allow_private=False, timeout_s=1)


# -- the GET ----------------------------------------------------------------------------------------------------


def test_a_confirmation_over_https(sns: ConfirmEndpoint, ca: TestCA) -> None:
    for host in LOOPBACK:
        url = f"https://{host}:{sns.port}/?Action=ConfirmSubscription&Token=1"
        confirm_subscription(url, LOOPBACK, allow_private=True, ssl_context=ca.client_context())
    assert sns.paths == ["/?Action=ConfirmSubscription&Token=1"] * 2
    assert sns.sni == ["localhost", None]  # no SNI for an IP address, which the certificate names


def test_ip_literals_and_private_addresses_need_sns_confirm_private(sns: ConfirmEndpoint, ca: TestCA) -> None:
    for host in LOOPBACK:
        with pytest.raises(SnsConfirmError, match=r"IP address|not a public address"):
            confirm_subscription(
                f"https://{host}:{sns.port}/", LOOPBACK, allow_private=False, ssl_context=ca.client_context()
            )
    with pytest.raises(SnsConfirmError, match="IP address"):  # a public one too
        confirm_subscription("https://8.8.8.8/", ["8.8.8.8"], allow_private=False)
    assert sns.paths == []
    # sns_confirm_private never lifts the https or host-pattern checks
    for url in (f"http://127.0.0.1:{sns.port}/", f"https://localhost:{sns.port}/", f"https://[::1]:{sns.port}/"):
        with pytest.raises(SnsConfirmError):
            confirm_subscription(url, ["127.0.0.1"], allow_private=True, ssl_context=ca.client_context())
    assert sns.paths == []


def test_the_checked_address_is_the_one_connected_to(
    sns: ConfirmEndpoint, ca: TestCA, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lookup; the connection goes to what it answered; TLS still checks the name of the URL (SNI too)."""
    lookups = resolving_to("127.0.0.1")
    monkeypatch.setattr(socket, "getaddrinfo", lookups)
    url = f"https://sns.example.invalid:{sns.port}/ok"
    confirm_subscription(url, ["sns.example.invalid"], allow_private=True, ssl_context=ca.client_context())
    assert lookups.calls == ["sns.example.invalid"] and sns.paths == ["/ok"] and sns.sni == ["sns.example.invalid"]
    # A name that resolves to a private address is refused whole, even beside a public one (DNS rebinding).
    for answer in (["127.0.0.1"], ["8.8.8.8", "127.0.0.1"], ["::1"], ["169.254.169.254"]):
        monkeypatch.setattr(socket, "getaddrinfo", resolving_to(*answer))
        with pytest.raises(SnsConfirmError, match="not a public address"):
            confirm_subscription(url, ["sns.example.invalid"], allow_private=False, ssl_context=ca.client_context())
    assert sns.paths == ["/ok"]
    # The certificate must name the host of the URL, wherever it resolves.
    monkeypatch.setattr(socket, "getaddrinfo", resolving_to("127.0.0.1"))
    with pytest.raises(SnsConfirmError, match=r"CERTIFICATE_VERIFY_FAILED|mismatch"):
        confirm_subscription(
            f"https://other.example.invalid:{sns.port}/",
            ["other.example.invalid"],
            allow_private=True,
            ssl_context=ca.client_context(),
        )
    assert sns.paths == ["/ok"]


def test_an_untrusted_certificate_fails(sns: ConfirmEndpoint) -> None:
    with pytest.raises(SnsConfirmError, match="CERTIFICATE_VERIFY_FAILED"):
        confirm_subscription(f"https://localhost:{sns.port}/", LOOPBACK, allow_private=True)
    assert sns.paths == []


def test_redirects_are_not_followed_and_non_2xx_fails(sns: ConfirmEndpoint, ca: TestCA) -> None:
    for path, status in (("/redirect", "302"), ("/denied?Token=1", "403")):
        with pytest.raises(SnsConfirmError, match=status):
            confirm_subscription(
                f"https://localhost:{sns.port}{path}", LOOPBACK, allow_private=True, ssl_context=ca.client_context()
            )
    assert sns.paths == ["/redirect", "/denied?Token=1"]


def test_the_answer_is_read_up_to_a_cap(sns: ConfirmEndpoint, ca: TestCA) -> None:
    started = time.monotonic()
    confirm_subscription(
        f"https://localhost:{sns.port}/huge", LOOPBACK, allow_private=True, ssl_context=ca.client_context()
    )
    assert time.monotonic() - started < 5
    assert sns.huge_done.wait(10) and sns.huge_complete is False
    assert MAX_BODY_BYTES == 64 * 1024


def test_a_silent_server_times_out() -> None:
    with socket.socket() as listener:  # accepts connections (the backlog) but never says a word
        listener.bind(("127.0.0.1", 0))
        listener.listen(4)
        started = time.monotonic()
        with pytest.raises(SnsConfirmError, match="timed out"):
            confirm_subscription(
                f"https://127.0.0.1:{listener.getsockname()[1]}/", ["127.0.0.1"], allow_private=True, timeout_s=1
            )
        assert time.monotonic() - started < 3


def test_the_deadline_holds_against_a_trickle(sns: ConfirmEndpoint, ca: TestCA) -> None:
    """A byte now and then resets a socket timeout; the deadline cuts the connection anyway."""
    started = time.monotonic()
    with pytest.raises(SnsConfirmError, match="timed out"):
        confirm_subscription(
            f"https://localhost:{sns.port}/trickle",
            LOOPBACK,
            allow_private=True,
            timeout_s=1,
            ssl_context=ca.client_context(),
        )
    assert time.monotonic() - started < 3
    assert sns.trickle_done.wait(5)  # the stand-in saw the connection go


def test_connection_failures(monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        with pytest.raises(SnsConfirmError, match="cannot connect"):
            confirm_subscription(f"https://127.0.0.1:{closed.getsockname()[1]}/", ["127.0.0.1"], allow_private=True)
    with pytest.raises(SnsConfirmError, match="cannot resolve"):
        confirm_subscription("https://nowhere.invalid/", ["nowhere.invalid"], allow_private=True)


def test_the_token_never_reaches_the_log() -> None:
    url = "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=2336412f37fb&TopicArn=x"
    assert redact(url) == "https://sns.us-east-1.amazonaws.com/?Action=ConfirmSubscription&Token=<redacted>&TopicArn=x"
    assert SnsConfirmError(f"could not parse {url!r}").cause.count("2336412f37fb") == 0
