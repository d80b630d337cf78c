"""The fleet as a whole: GPUs, the dashboard's overview, GPU usage, the scaling figure, Prometheus metrics, health."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, Query, Response

from gpufleet.api import dashboard, models
from gpufleet.api.deps import GUARDED, MONITORED, Control, authorize_monitoring, errors
from gpufleet.api.metrics import CONTENT_TYPE, exposition
from gpufleet.control.usage import SINCE_PATTERN

router = APIRouter(prefix="/v1", tags=["fleet"], dependencies=GUARDED, responses=errors(401, 422, 503))
# What an autoscaler or a scraper reads: api.monitoring_token is enough.
figures = APIRouter(prefix="/v1", tags=["fleet"], dependencies=MONITORED, responses=errors(401, 422, 503))
# Not under /v1: a scraper's and a load balancer's fixed paths.
outside = APIRouter(tags=["fleet"])
TEXT = {"description": "the Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}}


@router.get("/gpus", response_model=models.GpuList)
def list_gpus(control: Control) -> dict[str, Any]:
    """Every GPU (or virtual GPU) slot, as the workers' supervisors report them, and the task each runs; and the
    same by pool and model."""
    return control.gpu_inventory()


@router.post("/gpus/{worker}/cordon", response_model=models.Cordon, responses=errors(400, 404))
def cordon_gpu(control: Control, worker: str, body: models.CordonRequest | None = None) -> dict[str, Any]:
    """Take a GPU out of service: its worker finishes the task it runs, then takes none until it is uncordoned."""
    return control.cordon(worker, body.reason if body else "")


@router.post("/gpus/{worker}/uncordon", response_model=models.Cordon, responses=errors(404))
def uncordon_gpu(control: Control, worker: str) -> dict[str, Any]:
    """Back in service: its worker starts again within seconds (a GPU still found broken is cordoned again)."""
    return control.uncordon(worker)


@router.get("/overview", response_model=models.Overview)
def fleet_overview(control: Control) -> dict[str, Any]:
    """What the dashboard shows: GPUs with their task's progress, queues, tasks finished per minute over the
    last hour, and the latest dead letters."""
    return dashboard.overview(control)


@figures.get("/usage", response_model=models.UsageList)
def gpu_usage(
    control: Control,
    since: Annotated[
        str, Query(pattern=f"^{SINCE_PATTERN}$", description="how far back: 90m, 24h, 7d (whole hours, up to 35d)")
    ] = "24h",
    by: Annotated[Literal["function", "pool", "model"], Query()] = "function",
) -> dict[str, Any]:
    """GPU seconds (every run, GPUs held x handler time), runs and cost by function, pool or GPU model, as
    ``gpufleet usage`` prints them."""
    return {"items": control.usage(since, by)}


@figures.get("/scaling", response_model=models.ScalingList)
def scaling(control: Control) -> dict[str, Any]:
    """How many GPU worker hosts each pool and GPU model needs now (the figure an autoscaler reads)."""
    return {"items": [need.view() for need in control.scaling()]}


@figures.get("/scaling/{pool}/{model}", response_model=models.ScalingNeed)
def scaling_one(control: Control, pool: str, model: str) -> dict[str, Any]:
    """The scaling figure of one pool and GPU model (``any`` for functions that take any GPU). For KEDA's
    metrics-api scaler: ``valueLocation: desired``."""
    return control.scaling(pool, model)[0].view()


@outside.get(
    "/metrics",
    dependencies=[Depends(authorize_monitoring)],
    response_class=Response,
    responses={200: TEXT, **errors(401, 503)},
)
def metrics(control: Control) -> Response:
    """Prometheus metrics of the whole fleet, read from Redis at each scrape (any api replica answers the
    same). Needs a token, the monitoring one will do: ``authorization: {credentials_file: ...}`` in the scrape
    config."""
    return Response(exposition(control.fleet, control.registry), media_type=CONTENT_TYPE)


@outside.get("/healthz", response_model=models.Health, responses=errors(503))
def healthz(control: Control) -> dict[str, str]:
    """Liveness and readiness: 200 when Redis answers. Needs no token."""
    control.ping()
    return {"status": "ok"}
