"""``/v1/parked``: records a destination refused for good, to list, send again or drop."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated, Any

from fastapi import APIRouter, Query

from gpufleet.api import models
from gpufleet.api.deps import GUARDED, Control, Limit, errors

router = APIRouter(prefix="/v1/parked", tags=["fleet"], dependencies=GUARDED, responses=errors(401, 422, 503))


@router.get("", response_model=models.ParkedPage)
def list_parked(
    control: Control,
    limit: Limit,
    after: Annotated[
        str | None, Query(description="the id of the last record of the previous page", pattern=models.PARKED_ID)
    ] = None,
) -> dict[str, Any]:
    """Records a destination refused for good (too large, not allowed), oldest first: they wait here, with the
    reason, instead of holding up the records behind them."""
    return control.parked(limit, after)


@router.post("/resend", response_model=models.ParkedOutcome, responses=errors(400))
def resend_parked(control: Control, action: models.ParkedAction) -> dict[str, Any]:
    """Send parked records (``ids``, or ``all``) to their destinations again; refused again, they park again."""
    return {"count": control.resend_parked(None if action.all else action.ids)}


@router.post("/drop", response_model=models.ParkedOutcome, responses=errors(400))
def drop_parked(control: Control, action: models.ParkedAction) -> dict[str, Any]:
    """Forget parked records for good."""
    return {"count": control.drop_parked(action.ids)}
