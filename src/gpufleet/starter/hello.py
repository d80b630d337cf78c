"""A first function, written by `gpufleet init`: make it yours.

Each event becomes a task that runs on one GPU (or a virtual one), one task per GPU at a time. What the handler
returns is the Success record's ``responsePayload``; an exception is retried, then a failure record says why.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel

from gpufleet import Context, function


class Greeting(BaseModel):
    """The event. One that does not validate goes to the dead-letter destination with the reason."""

    name: str = "world"


@function(name="hello", timeout_s=60, max_attempts=3, payload=Greeting)
def hello(event: Greeting, ctx: Context) -> dict[str, Any]:
    ctx.progress(0.5, f"greeting {event.name}")
    return {"greeting": f"hello, {event.name}", "prefix": ctx.state["prefix"], "gpu": ctx.gpu}


@hello.setup
def load() -> dict[str, Any]:
    """Runs once per GPU worker process, before its first task: load your model here, and it stays warm."""
    return {"prefix": "warm"}
