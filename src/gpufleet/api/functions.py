"""``/v1/functions``: invoke a function, and what the fleet serves: functions, queues, versions, aliases."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, Query, Response

from gpufleet.api import models
from gpufleet.api.deps import GUARDED, AliasName, Control, FunctionName, errors, read_body, task_url
from gpufleet.control.plane import MAX_IDEMPOTENCY_KEY
from gpufleet.intake.events import MAX_DEPTH
from gpufleet.registry.messages import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY

# Visible ASCII with inner spaces: what survives an HTTP header unchanged (servers strip surrounding spaces).
IDEMPOTENCY_KEY_RE = r"^[!-~](?:[ -~]*[!-~])?$"
EVENT = {
    "required": True,
    "description": f"the event, any JSON value (at most defaults.max_payload_bytes, {MAX_DEPTH} levels deep, integers "
    "within 64 bits); it must match the function's payload_schema, if it has one",
    "content": {"application/json": {"schema": {}}},
}
LOCATION = {"Location": {"description": "the task: /v1/tasks/{id}", "schema": {"type": "string"}}}
IdempotencyKey = Annotated[
    str | None,
    Header(
        alias="Idempotency-Key",
        max_length=MAX_IDEMPOTENCY_KEY,
        pattern=IDEMPOTENCY_KEY_RE,
        description="the same key (per function) always names the same task: retrying is safe",
    ),
]
TraceParent = Annotated[
    str | None,
    Header(
        max_length=512,
        description="W3C trace context: the task is a span of this trace (a new trace without one); its "
        "callback records carry the task's traceparent",
    ),
]
Priority = Annotated[
    int,
    Query(
        ge=MIN_PRIORITY,
        le=MAX_PRIORITY,
        description="0 (lowest) to 9 (highest): higher runs first in the function's "
        "queue; a waiting task moves up one level each defaults.priority_aging_s, so none waits for ever",
    ),
]

router = APIRouter(prefix="/v1/functions", tags=["functions"], dependencies=GUARDED, responses=errors(401, 422, 503))


@router.post(
    "/{name}/invocations",
    status_code=202,
    response_model=models.Invocation,
    responses={202: {"headers": LOCATION}, **errors(404, 409, 413)},
    openapi_extra={"requestBody": EVENT},
)
def invoke(
    control: Control,
    name: FunctionName,
    body: Annotated[bytes, Depends(read_body)],
    response: Response,
    idempotency_key: IdempotencyKey = None,
    traceparent: TraceParent = None,
    priority: Priority = DEFAULT_PRIORITY,
) -> models.Invocation:
    """Queue a task: answers 202 and its id at once; follow it at the Location."""
    invocation = control.invoke(name, body, idempotency_key, traceparent, priority)  # 404 for an unknown function
    response.headers["Location"] = task_url(invocation.id)
    return models.Invocation(id=invocation.id, created=invocation.created)


@router.get("", response_model=models.FunctionList)
def list_functions(control: Control) -> dict[str, Any]:
    """The functions this fleet serves, with their GPU needs, limits and payload schemas."""
    return {"items": control.functions()}


@router.get("/{name}/queue", response_model=models.QueueInfo, responses=errors(404))
def function_queue(control: Control, name: FunctionName) -> dict[str, Any]:
    """Queue length and tasks per state for one function."""
    return control.queue(name)


@router.get("/{name}/versions", response_model=models.VersionList, responses=errors(404))
def function_versions(control: Control, name: FunctionName) -> dict[str, Any]:
    """Each version of the function declared here or served by a live worker, and its state: ACTIVE, DEPLOYING,
    ERROR (with the setup error) or INACTIVE."""
    return {"items": control.versions(name)}


@router.get("/{name}/aliases", response_model=models.AliasList, responses=errors(404))
def function_aliases(control: Control, name: FunctionName) -> dict[str, Any]:
    """The function's aliases: the fleet's config, with those changed at run time over them."""
    return {"aliases": control.aliases(name)}


@router.put("/{name}/aliases/{alias}", response_model=models.AliasList, responses=errors(400, 404, 422))
def set_function_alias(
    control: Control, name: FunctionName, alias: AliasName, change: models.AliasChange
) -> dict[str, Any]:
    """Point an alias at these versions, with these weights, for every intake from now on (logged)."""
    return {"aliases": control.set_alias(name, alias, change.weights, by="api")}
