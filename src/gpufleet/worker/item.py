"""A task a pool process has claimed, as the runtime, the claim-ahead helper, batches and jobs pass it around."""

from __future__ import annotations

from typing import Any, NamedTuple

from gpufleet.registry.model import Claim


class Item(NamedTuple):
    """A task this pool process has claimed: its call, its claim, and the owner token it runs under."""

    task_id: str
    function: str
    event: Any
    meta: dict[str, Any]
    claim: Claim
    token: str
