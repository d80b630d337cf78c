"""The dashboard in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright against a running
fleet. Skipped when Chromium or Playwright is missing, except under ``CI=true``."""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.integration.test_api import TOKEN, Api, _serve

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
SCREENSHOT = os.environ.get("GPUFLEET_DASHBOARD_SCREENSHOT")  # where to save one (the README's)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed")
    if CHROMIUM is None:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium is missing: .ci/run installs Debian's chromium package")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu"])
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def fleet(services: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    with _serve(services, tmp_path_factory.mktemp("dashboard"), worker={"virtual_gpus": 2, "cancel_grace_s": 5}) as api:
        yield api


def test_log_in_see_a_task_run_and_cancel_one(browser: Any, fleet: Api, tmp_path: Path) -> None:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    outside: list[str] = []
    page.on("request", lambda r: None if r.url.startswith(fleet.url) else outside.append(r.url))
    urls: list[str] = []
    page.on("framenavigated", lambda frame: urls.append(frame.url))

    page.goto(f"{fleet.url}/dashboard")
    page.wait_for_selector("#login-form", state="visible")
    page.fill("#token", "not-the-token-0123456789abcdefghijklmnop")
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#login-error:has-text('not the fleet')")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.wait_for_selector("#gpus .card.idle", timeout=60_000)  # a worker, ready and free

    done = fleet.invoke("echo", {"from": "the dashboard test"})
    failed = fleet.invoke("always_fail", {"for": "the chart"})
    fleet.harness.produce("requests", [b"{not json"])  # a dead letter, from the fleet's Kafka trigger
    long = fleet.invoke("coop", {"seconds": 120})
    page.wait_for_selector(f"#gpus .card.busy button[data-task='{long}']", timeout=60_000)
    page.wait_for_selector(f"#tasks tr:has(button[data-task='{done}']) .state-SUCCEEDED", timeout=60_000)
    page.wait_for_selector("#queues tbody tr")
    page.wait_for_selector(f"#tasks tr:has(button[data-task='{failed}']) .state-FAILED", timeout=60_000)
    page.wait_for_selector("#chart rect.ok", timeout=60_000)
    page.wait_for_selector("#chart rect.bad", timeout=60_000)
    page.wait_for_selector("#dead tbody tr:has-text('malformed_json')", timeout=60_000)
    if SCREENSHOT:
        page.screenshot(path=SCREENSHOT, full_page=True)

    page.click(f"#tasks button[data-task='{long}']")
    page.wait_for_selector("#task[data-state='RUNNING']")
    page.click("#cancel")
    page.wait_for_selector("#action-result:has-text('cancel: cancelling')")
    page.wait_for_selector("#task[data-state='CANCELLED']", timeout=30_000)
    assert fleet.task(long)["state"] == "CANCELLED"
    page.click("#retry")  # and back again, from the page
    page.wait_for_selector("#action-result:has-text('retry: queued')")
    fleet.client.post(f"/v1/tasks/{long}/cancel")

    cookies = {c["name"]: c for c in context.cookies()}
    assert cookies["gpufleet_session"]["httpOnly"] and cookies["gpufleet_session"]["sameSite"] == "Strict"
    assert TOKEN not in cookies["gpufleet_session"]["value"]
    assert not outside, outside  # no CDN, nothing fetched from anywhere else
    assert all(TOKEN not in url for url in urls)
    context.close()


def test_a_job_shows_its_shards_progress_and_the_one_that_failed(browser: Any, fleet: Api) -> None:
    job = fleet.invoke("tiles", {"n": 4, "shard": {"2": {"broken": "dashboard"}}})
    fleet.harness.wait_for(lambda: fleet.task(job)["state"] == "FAILED", what="the job to fail")
    view = fleet.task(job)  # the API's view, through its response model
    assert view["phase"] == "merge" and view["shards"]["counts"] == {"SUCCEEDED": 3, "FAILED": 1}
    assert view["shards"]["items"][2]["error"]["errorType"] == "ValueError"
    context = browser.new_context()
    page = context.new_page()
    page.goto(f"{fleet.url}/dashboard")
    page.fill("#token", TOKEN)
    page.click("#login-form button[type=submit]")
    page.click(f"#tasks button[data-task='{job}']", timeout=60_000)
    page.wait_for_selector("#shards-summary:has-text('4/4 shards done: 3 SUCCEEDED, 1 FAILED')")
    row = page.locator("#shards tbody tr").nth(2)
    assert row.locator(".state-FAILED").inner_text() == "FAILED"
    assert "ValueError: tile 2 cannot be processed" in row.inner_text()
    context.close()


def test_the_session_cookie_is_not_enough_to_change_anything_without_the_csrf_header(fleet: Api) -> None:
    with httpx.Client(base_url=fleet.url, timeout=30) as anonymous:
        assert anonymous.get("/v1/overview").status_code == 401
        assert anonymous.post("/dashboard/login", json={"token": "wrong"}).status_code == 401
        r = anonymous.post("/dashboard/login", json={"token": TOKEN})
        assert r.status_code == 204 and "HttpOnly" in r.headers["set-cookie"]
        assert anonymous.get("/v1/overview").status_code == 200  # the cookie, now kept by the client
        task = fleet.invoke("coop", {"seconds": 60})
        assert anonymous.post(f"/v1/tasks/{task}/cancel").status_code == 401  # a cross-site form could do this
        ok = anonymous.post(f"/v1/tasks/{task}/cancel", headers={"X-Gpufleet-Csrf": "1"})
        assert ok.status_code == 200 and ok.json()["outcome"] in ("cancelled", "cancelling")
        anonymous.cookies.clear()
        anonymous.cookies.set("gpufleet_session", "0" * 32 + ".forged")
        assert anonymous.get("/v1/overview").status_code == 401
        page = anonymous.get("/dashboard")
        assert page.status_code == 200 and "frame-ancestors 'none'" in page.headers["content-security-policy"]
        assert anonymous.get("/dashboard/static/dashboard.js").status_code == 200
        assert anonymous.get("/dashboard/static/..%2Fapp.py").status_code == 404


def test_logout_ends_the_session_on_the_server_and_each_login_gets_its_own(fleet: Api) -> None:
    """Before: logging out only asked the browser to drop the cookie (a copy of it still worked for 12 h), two
    logins in one second got the same cookie, and behind a TLS proxy the cookie lacked Secure."""
    cookies = []
    for _ in range(2):  # within a second
        r = httpx.post(f"{fleet.url}/dashboard/login", json={"token": TOKEN}, timeout=30)
        assert r.status_code == 204
        cookies.append(r.cookies["gpufleet_session"])
    assert cookies[0] != cookies[1]
    first, second = ({"gpufleet_session": c} for c in cookies)
    assert httpx.get(f"{fleet.url}/v1/overview", cookies=first).status_code == 200
    r = httpx.post(f"{fleet.url}/dashboard/logout", cookies=first)
    assert r.status_code == 303 and 'gpufleet_session=""' in r.headers["set-cookie"]
    assert httpx.get(f"{fleet.url}/v1/overview", cookies=first).status_code == 401  # the copy is worth nothing
    assert httpx.get(f"{fleet.url}/v1/overview", cookies=second).status_code == 200  # the other session lives on
    # A TLS proxy on a trusted address (FORWARDED_ALLOW_IPS, 127.0.0.1 by default) says the client came over https.
    proxied = httpx.post(f"{fleet.url}/dashboard/login", json={"token": TOKEN}, headers={"X-Forwarded-Proto": "https"})
    assert "; secure" in proxied.headers["set-cookie"].lower(), proxied.headers["set-cookie"]
    plain = httpx.post(f"{fleet.url}/dashboard/login", json={"token": TOKEN})
    assert "secure" not in plain.headers["set-cookie"].lower()
