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

The routes are one router per concern: :mod:`~gpufleet.api.functions` (invoke, and what is served),
:mod:`~gpufleet.api.tasks`, :mod:`~gpufleet.api.parked`, :mod:`~gpufleet.api.fleet` (GPUs, scaling, metrics,
health), :mod:`~gpufleet.api.dashboard` and :mod:`~gpufleet.api.webhooks`; what they share is in
:mod:`~gpufleet.api.deps`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import Depends, FastAPI
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute

from gpufleet import __version__
from gpufleet.api import dashboard, fleet, functions, parked, tasks
from gpufleet.api.deps import PAGE_SIZES, authorize
from gpufleet.api.errors import Observe, install_error_handlers
from gpufleet.api.protocol import RequestLimit
from gpufleet.api.webhooks import router as webhook_router
from gpufleet.control.plane import ControlPlane
from gpufleet.triggers.webhook import WebhookTrigger


def create_app(control: ControlPlane, token: str, webhooks: Sequence[WebhookTrigger] = ()) -> FastAPI:
    """Build the app for one control plane. ``token`` is the bearer token every route but /healthz and the
    webhooks require (each webhook trigger has its own secret)."""
    settings = control.fleet.settings
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
    # What the routes' dependencies read (gpufleet.api.deps): the routers themselves hold no state.
    app.state.control = control
    app.state.token = token.encode()
    app.state.sessions = dashboard.Sessions(token, control.registry.client, control.registry.prefix)
    install_error_handlers(app)
    app.add_middleware(Observe)
    app.add_middleware(RequestLimit, limit=settings.api.max_connections)  # outermost: a 503 costs nothing more
    for router in (functions.router, tasks.router, fleet.router, parked.router, fleet.figures, fleet.outside):
        app.include_router(router)
    app.include_router(dashboard.router(app.state.sessions))
    if webhooks:
        app.include_router(webhook_router(list(webhooks), settings.api.body_timeout_s))

    @app.get("/openapi.json", include_in_schema=False, dependencies=[Depends(authorize)])
    def openapi() -> JSONResponse:
        return JSONResponse(_spec(app, settings.api.max_page))

    return app


def _spec(app: FastAPI, max_page: int) -> dict[str, Any]:
    """The OpenAPI document, with each page size's maximum: ``api.max_page`` is this fleet's, not the code's."""
    if app.openapi_schema is None:
        spec = app.openapi()
        for item in spec["paths"].values():
            for op in item.values():
                for param in op.get("parameters", []):
                    if param["name"] in PAGE_SIZES:
                        for schema in param["schema"].get("anyOf", [param["schema"]]):
                            if schema.get("type") == "integer":
                                schema["maximum"] = max_page
    return app.openapi_schema or app.openapi()


def _operation_id(route: APIRoute) -> str:
    return route.name
