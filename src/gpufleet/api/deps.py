"""What every route of the HTTP API shares: the control plane and settings it serves (on ``app.state``, set by
:func:`gpufleet.api.app.create_app`), the bearer-token guards, the body reader, paging, and the parameter types.

The routes live in one module per concern (tasks, functions, fleet, parked, dashboard, webhooks), each an
``APIRouter`` with no state of its own.
"""

# No `from __future__ import annotations`: FastAPI reads the dependencies' signatures at runtime.
import secrets
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import Depends, Path, Query, Request, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpufleet.api import bodies, models
from gpufleet.api.dashboard import Sessions
from gpufleet.api.errors import UnauthorizedError
from gpufleet.control.plane import ControlPlane
from gpufleet.functions import ALIAS_RE
from gpufleet.registry.model import State
from gpufleet.settings import FleetSettings

DEFAULT_PAGE = 50
PAGE_SIZES = ("limit", "shards_limit")  # the query parameters api.max_page bounds (see page_of)

bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="the fleet's api.token")
Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]

STATE_NAMES = [s.value for s in State] + [s.value.lower() for s in State]  # the CLI takes any case
StateName = Annotated[
    str | None,
    Query(description="only tasks in this state, in upper or lower case", json_schema_extra={"enum": STATE_NAMES}),
]
TaskId = Annotated[str, Path(description="a task id, as invoke returned it or as its trigger named it")]
AliasName = Annotated[
    str,
    Path(description="an alias: a lowercase letter, then letters, digits, '_' or '-'", pattern=f"^{ALIAS_RE.pattern}$"),
]
FunctionName = Annotated[
    str, Path(description="a function name (GET /v1/functions lists them); to invoke one version alone, name:version")
]


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The error answers a route documents: each is an :class:`~gpufleet.api.models.ErrorResponse`."""
    return {status: {"model": models.ErrorResponse} for status in statuses}


def get_control(request: Request) -> ControlPlane:
    control: ControlPlane = request.app.state.control
    return control


def get_settings(request: Request) -> FleetSettings:
    settings: FleetSettings = request.app.state.control.fleet.settings
    return settings


Control = Annotated[ControlPlane, Depends(get_control)]
Settings = Annotated[FleetSettings, Depends(get_settings)]


async def authorize(request: Request, credentials: Credentials) -> None:
    """``Authorization: Bearer <api.token>``, or the dashboard's session cookie."""
    if credentials is None:
        sessions: Sessions = request.app.state.sessions
        if sessions.authorize(request):
            return
        raise UnauthorizedError("unauthorized", "send Authorization: Bearer <api.token>")
    # Bytes: compare_digest refuses non-ASCII str, and a header may hold any Latin-1 character.
    if not secrets.compare_digest(credentials.credentials.encode(), request.app.state.token):
        raise UnauthorizedError("unauthorized", "wrong bearer token")


async def authorize_monitoring(request: Request, credentials: Credentials) -> None:
    """The read-only figures (metrics, scaling): api.monitoring_token, or whatever :func:`authorize` takes."""
    monitoring = get_settings(request).api.monitoring_token
    given = b"" if credentials is None else credentials.credentials.encode()
    if monitoring is None or not secrets.compare_digest(given, monitoring.encode()):
        await authorize(request, credentials)


async def read_body(request: Request) -> bytes:
    """The raw body, after the token was checked: 413 as soon as it is known to exceed defaults.max_payload_bytes
    (before reading it all when Content-Length says so), 408 if it does not arrive within api.body_timeout_s."""
    settings = get_settings(request)
    return await bodies.read_body(request, settings.defaults.max_payload_bytes, settings.api.body_timeout_s)


def page_of(request: Request, limit: int | None, name: str, default: int) -> int:
    max_page = get_settings(request).api.max_page
    if limit is None:
        return min(default, max_page)
    if limit > max_page:
        raise RequestValidationError(
            [
                {
                    "loc": ("query", name),
                    "msg": f"at most api.max_page ({max_page})",
                    "type": "less_than_equal",
                    "input": limit,
                }
            ]
        )
    return limit


def page_limit(
    request: Request, limit: Annotated[int | None, Query(ge=1, description="page size, at most api.max_page")] = None
) -> int:
    return page_of(request, limit, "limit", DEFAULT_PAGE)


Limit = Annotated[int, Depends(page_limit)]


async def known_query(request: Request) -> None:
    """A query parameter the route does not take is an error (422), as an unknown config key is: a typo such as
    ``?fucntion=echo`` must not silently list every task."""
    if not request.query_params:
        return
    route = request.scope.get("route")
    known = _query_names(route.dependant) if isinstance(route, APIRoute) else frozenset()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise RequestValidationError(
            [{"loc": ("query", name), "msg": "unknown query parameter", "type": "extra_forbidden"} for name in unknown]
        )


def _query_names(dependant: Dependant) -> frozenset[str]:
    names = {param.alias for param in dependant.query_params}
    for sub in dependant.dependencies:
        names |= _query_names(sub)
    return frozenset(names)


GUARDED = [Depends(authorize), Depends(known_query)]  # every /v1 route but the figures
MONITORED = [Depends(authorize_monitoring), Depends(known_query)]  # what an autoscaler or a scraper reads


def task_url(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"
