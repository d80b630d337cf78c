"""The HTTP control plane: FastAPI routes over :class:`gpufleet.control.plane.ControlPlane`.

Every route but ``GET /healthz`` needs ``Authorization: Bearer <api.token>`` (``GET /metrics`` and ``GET
/v1/scaling`` also take ``api.monitoring_token``, which is good for nothing else); that includes the OpenAPI spec at
``/openapi.json``. Errors are JSON, ``{"error": {"code": ..., "message": ...}}`` (codes in
:mod:`gpufleet.api.errors`). The control plane talks to Redis synchronously, so the routes are plain ``def`` and
run in the server's threadpool.

Guarantees:

- ``POST /v1/functions/{name}/invocations`` answers 202 once the task is in Redis (record and queue written in one
  atomic step); the same ``Idempotency-Key`` for the same function always names the same task, which runs once.
- A body over ``defaults.max_payload_bytes`` is refused (413) before it is read in full.
"""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime, and they name
# dependencies local to create_app.
import secrets
from collections.abc import Sequence
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, FastAPI, Header, Path, Query, Request, Response, Security
from fastapi.dependencies.models import Dependant
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from gpufleet import __version__
from gpufleet.api import bodies, dashboard, models
from gpufleet.api.errors import Observe, UnauthorizedError, install_error_handlers
from gpufleet.api.metrics import CONTENT_TYPE, exposition
from gpufleet.api.protocol import RequestLimit
from gpufleet.api.webhooks import router as webhook_router
from gpufleet.control.plane import MAX_IDEMPOTENCY_KEY, ControlPlane
from gpufleet.errors import InvalidRequestError
from gpufleet.functions import ALIAS_RE
from gpufleet.intake.events import MAX_DEPTH
from gpufleet.registry.jobs import SHARD_PAGE
from gpufleet.registry.messages import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from gpufleet.registry.model import State
from gpufleet.triggers.webhook import WebhookTrigger

DEFAULT_PAGE = 50
# Visible ASCII with inner spaces: what survives an HTTP header unchanged (servers strip surrounding spaces).
IDEMPOTENCY_KEY_RE = r"^[!-~](?:[ -~]*[!-~])?$"


def _errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    return {status: {"model": models.ErrorResponse} for status in statuses}


STATE_NAMES = [s.value for s in State] + [s.value.lower() for s in State]  # the CLI takes any case
StateName = Annotated[str | None, Query(description="only tasks in this state, in upper or lower case",
                                        json_schema_extra={"enum": STATE_NAMES})]  # fmt: skip
TaskId = Annotated[str, Path(description="a task id, as invoke returned it or as its trigger named it")]
AliasName = Annotated[str, Path(description="an alias: a lowercase letter, then letters, digits, '_' or '-'",
                                pattern=f"^{ALIAS_RE.pattern}$")]  # fmt: skip
FunctionName = Annotated[
    str, Path(description="a function name (GET /v1/functions lists them); to invoke one version alone, name:version")
]


def create_app(control: ControlPlane, token: str, webhooks: Sequence[WebhookTrigger] = ()) -> FastAPI:
    """Build the app for one control plane. ``token`` is the bearer token every route but /healthz and the
    webhooks require (each webhook trigger has its own secret)."""
    settings = control.fleet.settings
    max_body = settings.defaults.max_payload_bytes
    max_page = settings.api.max_page
    body_timeout_s = settings.api.body_timeout_s
    bearer = HTTPBearer(auto_error=False, scheme_name="bearer", description="the fleet's api.token")
    expected = token.encode()
    monitoring = None if settings.api.monitoring_token is None else settings.api.monitoring_token.encode()

    sessions = dashboard.Sessions(token, control.registry.client, control.registry.prefix)

    Credentials = Annotated[HTTPAuthorizationCredentials | None, Security(bearer)]  # noqa: N806 - a type

    async def authorize(request: Request, credentials: Credentials) -> None:
        if credentials is None:
            if sessions.authorize(request):  # the dashboard's session cookie
                return
            raise UnauthorizedError("unauthorized", "send Authorization: Bearer <api.token>")
        # Bytes: compare_digest refuses non-ASCII str, and a header may hold any Latin-1 character.
        if not secrets.compare_digest(credentials.credentials.encode(), expected):
            raise UnauthorizedError("unauthorized", "wrong bearer token")

    async def authorize_monitoring(request: Request, credentials: Credentials) -> None:
        """The read-only figures (metrics, scaling): api.monitoring_token, or whatever ``authorize`` takes."""
        given = b"" if credentials is None else credentials.credentials.encode()
        if monitoring is None or not secrets.compare_digest(given, monitoring):
            await authorize(request, credentials)

    async def read_body(request: Request) -> bytes:
        """The raw body, after the token was checked: 413 as soon as it is known to exceed the limit (before
        reading it all when Content-Length says so), 408 if it does not arrive within api.body_timeout_s."""
        return await bodies.read_body(request, max_body, body_timeout_s)

    app = FastAPI(
        title="gpufleet",
        version=__version__,
        summary="Control plane of a gpufleet GPU worker fleet: invoke functions, follow, cancel and retry tasks.",
        openapi_url=None,  # served below, behind the bearer token
        docs_url=None,
        redoc_url=None,
        redirect_slashes=False,  # an API answers 404, not a redirect, for a path it does not serve
        generate_unique_id_function=_operation_id,
    )
    install_error_handlers(app)
    app.add_middleware(Observe)
    app.add_middleware(RequestLimit, limit=settings.api.max_connections)  # outermost: a 503 costs nothing more
    guards = [Depends(authorize), Depends(_known_query)]
    v1 = APIRouter(prefix="/v1", dependencies=guards, responses=_errors(401, 422, 503))

    @v1.post(
        "/functions/{name}/invocations",
        tags=["functions"],
        status_code=202,
        response_model=models.Invocation,
        responses={
            202: {"headers": {"Location": {"description": "the task: /v1/tasks/{id}", "schema": {"type": "string"}}}},
            **_errors(404, 409, 413),
        },
        openapi_extra={
            "requestBody": {
                "required": True,
                "description": f"the event, any JSON value (at most {max_body} bytes, {MAX_DEPTH} levels deep, "
                "integers within 64 bits); it must match the function's payload_schema, if it has one",
                "content": {"application/json": {"schema": {}}},
            }
        },
    )
    def invoke(
        name: FunctionName,
        body: Annotated[bytes, Depends(read_body)],
        response: Response,
        idempotency_key: Annotated[
            str | None,
            Header(
                alias="Idempotency-Key",
                max_length=MAX_IDEMPOTENCY_KEY,
                pattern=IDEMPOTENCY_KEY_RE,
                description="the same key (per function) always names the same task: retrying is safe",
            ),
        ] = None,
        traceparent: Annotated[
            str | None,
            Header(
                max_length=512,
                description="W3C trace context: the task is a span of this trace (a new trace "
                "without one); its callback records carry the task's traceparent",
            ),
        ] = None,
        priority: Annotated[
            int,
            Query(
                ge=MIN_PRIORITY,
                le=MAX_PRIORITY,
                description="0 (lowest) to 9 (highest): higher runs first in the function's queue; a waiting task "
                "moves up one level each defaults.priority_aging_s, so none waits for ever",
            ),
        ] = DEFAULT_PRIORITY,
    ) -> models.Invocation:
        """Queue a task: answers 202 and its id at once; follow it at the Location."""
        # 404 for an unknown function, whatever the body
        invocation = control.invoke(name, body, idempotency_key, traceparent, priority)
        response.headers["Location"] = _task_url(invocation.id)
        return models.Invocation(id=invocation.id, created=invocation.created)

    @v1.get("/tasks/{task_id}", tags=["tasks"], response_model=models.TaskView, responses=_errors(404))
    def get_task(
        task_id: TaskId,
        shards_offset: Annotated[int, Query(ge=0, description="a job: the first shard listed")] = 0,
        shards_limit: Annotated[int, Query(ge=1, le=max_page, description="a job: shards listed")] = SHARD_PAGE,
    ) -> dict[str, Any]:
        """A task's state, attempts, progress, timestamps, worker and GPU, and its result or error; a job's shards, a
        page at a time."""
        return control.status(task_id, shards_offset, shards_limit)

    @v1.post("/tasks/{task_id}/cancel", tags=["tasks"], response_model=models.CancelOutcome,
             responses=_errors(404, 409))  # fmt: skip
    def cancel_task(task_id: TaskId) -> dict[str, Any]:
        """Cancel: a queued task at once; a running one is signalled, then killed after worker.cancel_grace_s.
        A task that already finished is left as it is (outcome ``noop``, not an error)."""
        return control.cancel(task_id)

    @v1.post("/tasks/{task_id}/retry", tags=["tasks"], status_code=202, response_model=models.RetryOutcome,
             responses=_errors(404, 409))  # fmt: skip
    def retry_task(task_id: TaskId, response: Response) -> dict[str, Any]:
        """Run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task again, from attempt 1; 409 for any other state."""
        outcome = control.retry(task_id)
        response.headers["Location"] = _task_url(task_id)
        return outcome

    @v1.get("/tasks/{task_id}/position", tags=["tasks"], response_model=models.Position, responses=_errors(404))
    def task_position(task_id: TaskId) -> dict[str, Any]:
        """Where a queued task stands in its queue (1 = next to start)."""
        return control.position(task_id)

    @v1.get("/tasks", tags=["tasks"], response_model=models.TaskPage, responses=_errors(404))
    def list_tasks(
        function: Annotated[str | None, Query(description="only this function's tasks")] = None,
        state: StateName = None,
        limit: Annotated[int, Query(ge=1, le=max_page, description="page size")] = min(DEFAULT_PAGE, max_page),
        cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
    ) -> dict[str, Any]:
        """Tasks, newest first, a page at a time."""
        if state is not None and state not in STATE_NAMES:
            raise InvalidRequestError("bad_state", f"unknown state {state!r:.50}; use one of {STATE_NAMES}")
        return control.tasks(function, state, limit, cursor)

    @v1.get("/functions", tags=["functions"], response_model=models.FunctionList)
    def list_functions() -> dict[str, Any]:
        """The functions this fleet serves, with their GPU needs, limits and payload schemas."""
        return {"items": control.functions()}

    @v1.get("/functions/{name}/queue", tags=["functions"], response_model=models.QueueInfo, responses=_errors(404))
    def function_queue(name: FunctionName) -> dict[str, Any]:
        """Queue length and tasks per state for one function."""
        return control.queue(name)

    @v1.get("/functions/{name}/versions", tags=["functions"], response_model=models.VersionList,
            responses=_errors(404))  # fmt: skip
    def function_versions(name: FunctionName) -> dict[str, Any]:
        """Each version of the function declared here or served by a live worker, and its state: ACTIVE, DEPLOYING,
        ERROR (with the setup error) or INACTIVE."""
        return {"items": control.versions(name)}

    @v1.get("/functions/{name}/aliases", tags=["functions"], response_model=models.AliasList, responses=_errors(404))
    def function_aliases(name: FunctionName) -> dict[str, Any]:
        """The function's aliases: the fleet's config, with those changed at run time over them."""
        return {"aliases": control.aliases(name)}

    @v1.put("/functions/{name}/aliases/{alias}", tags=["functions"], response_model=models.AliasList,
            responses=_errors(400, 404, 422))  # fmt: skip
    def set_function_alias(name: FunctionName, alias: AliasName, change: models.AliasChange) -> dict[str, Any]:
        """Point an alias at these versions, with these weights, for every intake from now on (logged)."""
        return {"aliases": control.set_alias(name, alias, change.weights, by="api")}

    @v1.get("/gpus", tags=["fleet"], response_model=models.GpuList)
    def list_gpus() -> dict[str, Any]:
        """Every GPU (or virtual GPU) slot, as the workers' supervisors report them, and the task each runs; and the
        same by pool and model."""
        return control.gpu_inventory()

    @v1.get("/parked", tags=["fleet"], response_model=models.ParkedPage)
    def list_parked(
        limit: Annotated[int, Query(ge=1, le=max_page, description="page size")] = min(DEFAULT_PAGE, max_page),
        after: Annotated[
            str | None, Query(description="the id of the last record of the previous page", pattern=models.PARKED_ID)
        ] = None,
    ) -> dict[str, Any]:
        """Records a destination refused for good (too large, not allowed), oldest first: they wait here, with the
        reason, instead of holding up the records behind them."""
        return control.parked(limit, after)

    @v1.post("/parked/resend", tags=["fleet"], response_model=models.ParkedOutcome, responses=_errors(400))
    def resend_parked(action: models.ParkedAction) -> dict[str, Any]:
        """Send parked records (``ids``, or ``all``) to their destinations again; refused again, they park again."""
        return {"count": control.resend_parked(None if action.all else action.ids)}

    @v1.post("/parked/drop", tags=["fleet"], response_model=models.ParkedOutcome, responses=_errors(400))
    def drop_parked(action: models.ParkedAction) -> dict[str, Any]:
        """Forget parked records for good."""
        return {"count": control.drop_parked(action.ids)}

    # What an autoscaler or a scraper reads: api.monitoring_token is enough.
    figures = APIRouter(prefix="/v1", dependencies=[Depends(authorize_monitoring), Depends(_known_query)],
                        responses=_errors(401, 422, 503))  # fmt: skip

    @figures.get("/scaling", tags=["fleet"], response_model=models.ScalingList)
    def scaling() -> dict[str, Any]:
        """How many GPU worker hosts each pool and GPU model needs now (the figure an autoscaler reads)."""
        return {"items": [need.view() for need in control.scaling()]}

    @figures.get("/scaling/{pool}/{model}", tags=["fleet"], response_model=models.ScalingNeed)
    def scaling_one(pool: str, model: str) -> dict[str, Any]:
        """The scaling figure of one pool and GPU model (``any`` for functions that take any GPU). For KEDA's
        metrics-api scaler: ``valueLocation: desired``."""
        return control.scaling(pool, model)[0].view()

    @v1.get("/overview", tags=["fleet"], response_model=models.Overview)
    def fleet_overview() -> dict[str, Any]:
        """What the dashboard shows: GPUs with their task's progress, queues, tasks finished per minute over the
        last hour, and the latest dead letters."""
        return dashboard.overview(control)

    app.include_router(v1)
    app.include_router(figures)
    app.include_router(dashboard.router(sessions))

    text = {"description": "the Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}

    @app.get("/metrics", tags=["fleet"], dependencies=[Depends(authorize_monitoring)], response_class=Response,
             responses={200: text, **_errors(401, 503)})  # fmt: skip
    def metrics() -> Response:
        """Prometheus metrics of the whole fleet, read from Redis at each scrape (any api replica answers the
        same). Needs a token, the monitoring one will do: ``authorization: {credentials_file: ...}`` in the scrape
        config."""
        return Response(exposition(control.fleet, control.registry), media_type=CONTENT_TYPE)

    if webhooks:
        app.include_router(webhook_router(list(webhooks), body_timeout_s))

    @app.get("/healthz", tags=["fleet"], response_model=models.Health, responses=_errors(503))
    def healthz() -> dict[str, str]:
        """Liveness and readiness: 200 when Redis answers. Needs no token."""
        control.ping()
        return {"status": "ok"}

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    return app


async def _known_query(request: Request) -> None:
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


def _task_url(task_id: str) -> str:
    return f"/v1/tasks/{quote(task_id, safe='')}"


def _operation_id(route: APIRoute) -> str:
    return route.name
