"""``/v1/tasks``: a task's state, cancel, retry, queue position, and the task list."""

# No `from __future__ import annotations`: FastAPI reads the route signatures at runtime.
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response

from gpufleet.api import models
from gpufleet.api.deps import GUARDED, STATE_NAMES, Control, Limit, StateName, TaskId, errors, page_of, task_url
from gpufleet.errors import InvalidRequestError
from gpufleet.registry.jobs import SHARD_PAGE

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=GUARDED, responses=errors(401, 422, 503))


def shard_limit(
    request: Request,
    shards_limit: Annotated[int | None, Query(ge=1, description="a job: shards listed, at most api.max_page")] = None,
) -> int:
    return page_of(request, shards_limit, "shards_limit", SHARD_PAGE)


@router.get("/{task_id}", response_model=models.TaskView, responses=errors(404))
def get_task(
    control: Control,
    task_id: TaskId,
    shards_limit: Annotated[int, Depends(shard_limit)],
    shards_offset: Annotated[int, Query(ge=0, description="a job: the first shard listed")] = 0,
) -> dict[str, Any]:
    """A task's state, attempts, progress, timestamps, worker and GPU, and its result or error; a job's shards, a
    page at a time."""
    return control.status(task_id, shards_offset, shards_limit)


@router.post("/{task_id}/cancel", response_model=models.CancelOutcome, responses=errors(404, 409))
def cancel_task(control: Control, task_id: TaskId) -> dict[str, Any]:
    """Cancel: a queued task at once; a running one is signalled, then killed after worker.cancel_grace_s.
    A task that already finished is left as it is (outcome ``noop``, not an error)."""
    return control.cancel(task_id)


@router.post("/{task_id}/retry", status_code=202, response_model=models.RetryOutcome, responses=errors(404, 409))
def retry_task(control: Control, task_id: TaskId, response: Response) -> dict[str, Any]:
    """Run a FAILED, TIMED_OUT, CANCELLED or EXPIRED task again, from attempt 1; 409 for any other state."""
    outcome = control.retry(task_id)
    response.headers["Location"] = task_url(task_id)
    return outcome


@router.get("/{task_id}/position", response_model=models.Position, responses=errors(404))
def task_position(control: Control, task_id: TaskId) -> dict[str, Any]:
    """Where a queued task stands in its queue (1 = next to start)."""
    return control.position(task_id)


@router.get("", response_model=models.TaskPage, responses=errors(404))
def list_tasks(
    control: Control,
    limit: Limit,
    function: Annotated[str | None, Query(description="only this function's tasks")] = None,
    state: StateName = None,
    cursor: Annotated[str | None, Query(description="next_cursor of the previous page")] = None,
) -> dict[str, Any]:
    """Tasks, newest first, a page at a time."""
    if state is not None and state not in STATE_NAMES:
        raise InvalidRequestError("bad_state", f"unknown state {state!r:.50}; use one of {STATE_NAMES}")
    return control.tasks(function, state, limit, cursor)
