"""The live dashboard: one page served by the api role, its assets from the package (no CDN, works offline).

Logging in: the page posts the API token once, in a JSON body (never in a URL), and gets a session cookie back:
``HttpOnly``, ``SameSite=Strict``, ``Secure`` over HTTPS (behind a TLS proxy too: uvicorn takes the scheme from
``X-Forwarded-Proto`` when the proxy's address is in ``FORWARDED_ALLOW_IPS``), valid for :data:`SESSION_S`. The
cookie holds a random session id and an HMAC of it under a key derived from the token, not the token itself; the
session lives in Redis (``<prefix>:session:<id>``, expiring with it). So every api replica accepts it, logging out
ends it on the server (a copy of the cookie is worth nothing after), and rotating the token ends every session.

With that cookie, the page calls the same ``/v1`` routes a script calls with the bearer token. A request that changes
something must also carry the :data:`CSRF_HEADER` header: another site cannot send one without a CORS preflight,
which this API never answers. The page polls ``GET /v1/overview`` every two seconds.
"""

import hashlib
import hmac
import secrets
from importlib import resources
from typing import Annotated, Any

import redis
from fastapi import APIRouter, Body, Request, Response
from fastapi.responses import RedirectResponse

from gpufleet.api.errors import UnauthorizedError
from gpufleet.registry.keyspace import Keyspace

COOKIE = "gpufleet_session"
CSRF_HEADER = "x-gpufleet-csrf"
SESSION_S = 12 * 3600
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
ASSETS = {"dashboard.js": "text/javascript", "dashboard.css": "text/css"}
# Only this origin's own scripts, styles and calls; the page cannot be framed (clickjacking).
SECURITY_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
    "img-src 'self' data:; base-uri 'none'; form-action 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


class Sessions:
    def __init__(self, token: str, client: redis.Redis, prefix: str) -> None:
        self._token = token.encode()
        self._key = hashlib.sha256(b"gpufleet-dashboard-session\x00" + self._token).digest()
        self._client, self._prefix = client, prefix

    def token_matches(self, candidate: str) -> bool:
        return secrets.compare_digest(candidate.encode(), self._token)

    def new(self) -> str:
        """A new session: its cookie value. Two logins, even in the same second, never share one."""
        session = secrets.token_hex(16)
        self._client.set(self._name(session), b"1", ex=SESSION_S)
        return f"{session}.{self._sign(session)}"

    def valid(self, cookie: str) -> bool:
        session = self._session(cookie)
        return session is not None and bool(self._client.exists(self._name(session)))

    def end(self, cookie: str) -> None:
        session = self._session(cookie)
        if session is not None:
            self._client.delete(self._name(session))

    def _session(self, cookie: str) -> str | None:
        session, _, signature = cookie.partition(".")
        if len(session) != 32 or not hmac.compare_digest(signature.encode(), self._sign(session).encode()):
            return None
        return session

    def _name(self, session: str) -> str:
        return Keyspace(self._prefix).session(session)

    def _sign(self, session: str) -> str:
        return hmac.new(self._key, session.encode(), hashlib.sha256).hexdigest()

    def authorize(self, request: Request) -> bool:
        """A request without a bearer token: its session cookie, and for a change the CSRF header too."""
        cookie = request.cookies.get(COOKIE)
        if not cookie or not self.valid(cookie):
            return False
        return request.method in SAFE_METHODS or request.headers.get(CSRF_HEADER) == "1"


def _asset(name: str) -> bytes:
    return resources.files("gpufleet.api").joinpath("static", name).read_bytes()


def router(sessions: Sessions) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    @pages.get("/dashboard")
    def page() -> Response:
        return Response(_asset("dashboard.html"), media_type="text/html; charset=utf-8", headers=SECURITY_HEADERS)

    @pages.get("/dashboard/static/{name}")
    def asset(name: str) -> Response:
        if name not in ASSETS:
            return Response(status_code=404, headers=SECURITY_HEADERS)
        return Response(_asset(name), media_type=ASSETS[name], headers=SECURITY_HEADERS)

    @pages.post("/dashboard/login")
    def login(request: Request, token: Annotated[str, Body(embed=True, max_length=4096)]) -> Response:
        if not sessions.token_matches(token):
            raise UnauthorizedError("unauthorized", "wrong token")
        response = Response(status_code=204, headers=SECURITY_HEADERS)
        response.set_cookie(
            COOKIE,
            sessions.new(),
            max_age=SESSION_S,
            path="/",
            httponly=True,
            samesite="strict",
            secure=request.url.scheme == "https",
        )
        return response

    @pages.post("/dashboard/logout")
    def logout(request: Request) -> Response:
        sessions.end(request.cookies.get(COOKIE, ""))  # on the server: the cookie is worth nothing from now on
        response = RedirectResponse("/dashboard", status_code=303, headers=SECURITY_HEADERS)
        response.delete_cookie(COOKIE, path="/", httponly=True, samesite="strict")
        return response

    return pages


def overview(control: Any, recent_dead: int = 20) -> dict[str, Any]:
    """What the page shows besides the task list: GPUs with their task's progress, queues, the last hour per
    minute, and the latest dead letters."""
    snap = control.snapshot(minutes=60)
    held = [task_id for g in snap.gpus for task_id in g.get("task_ids", [])]
    tasks = {t["id"]: t for t in control.registry.get_many(held) if t}
    gpus = []
    for g in snap.gpus:
        # Each task it holds (a batch's events each), with its own progress; "task" is the first, as before.
        mine = [
            {k: tasks[i].get(k) for k in ("id", "function", "progress", "progress_message", "started_at", "attempts")}
            for i in g.get("task_ids", [])
            if i in tasks
        ]
        gpus.append({**g, "tasks": mine, "task": mine[0] if mine else None})
    queues = [
        {"name": q.name, "depth": q.depth, "oldest_age_s": round(q.oldest_age_s, 3), "running": q.running}
        for q in sorted(snap.queues.values(), key=lambda q: q.name)
    ]
    return {
        "at": snap.at,
        "gpus": gpus,
        "queues": queues,
        "per_minute": [{"minute": m, "succeeded": ok, "failed": failed} for m, ok, failed in snap.per_minute],
        "dead_letters": control.recent_dead_letters(recent_dead),
        "dead_letters_total": sum(snap.dead_letters.values()),
        "callback_backlog": snap.callback_backlog,
        "parked": snap.parked,
    }
