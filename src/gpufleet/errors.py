"""The one error tree of gpufleet.

Every exception gpufleet raises derives from :class:`GpufleetError`. A ``retriable`` class attribute tells callers
whether trying the same operation again may succeed (as aiokafka does), so retry loops need no isinstance ladders.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class GpufleetError(Exception):
    """Root of every gpufleet error."""

    retriable: bool = False


class ConfigError(GpufleetError):
    """A configuration file, trigger file, function module or environment variable is invalid.

    The message names the file, the key and the fix.
    """

    def __init__(self, message: str, *, file: str | None = None, key: str | None = None, fix: str | None = None):
        self.file = file
        self.key = key
        self.fix = fix
        parts = [f"{file}: " if file else "", f"{key}: " if key else "", message]
        if fix:
            parts.append(f" (fix: {fix})")
        super().__init__("".join(parts))


class ServiceError(GpufleetError):
    """A local development service (Redis, Kafka) could not be started or stopped."""


class PortTakenError(ServiceError):
    """A local server could not bind its port: another process holds it."""


class BrokerError(GpufleetError):
    """The task broker or registry could not be reached; the operation may succeed later."""

    retriable = True


class PortInUseError(GpufleetError):
    """A port this process must listen on is taken (often: the fleet is already running on this machine)."""


class DeliveryError(GpufleetError):
    """A callback or dead-letter record could not be delivered to its destination."""

    retriable = True


class EventError(GpufleetError):
    """An incoming message cannot become a task: it goes to the dead-letter destination with this reason.

    ``reason`` is a stable, machine-readable code (``malformed_json``, ``schema_mismatch``, ``unknown_function``,
    ``oversize``, ``bad_id``, ``gpu_memory``).
    """

    def __init__(self, reason: str, detail: str):
        self.reason = reason
        self.detail = detail
        super().__init__(f"{reason}: {detail}")


class TaskError(GpufleetError):
    """Raised inside a worker when a task cannot proceed (lost lease, cancelled)."""


class TaskPreempted(BaseException):
    """Raised in a running handler when its host's GPUs are being reclaimed (a spot VM's notice): the function's
    ``on_preempt`` hook has run, and the task goes back to its queue, its attempt not counted against
    ``max_attempts``. A BaseException, so an ``except Exception`` in a handler does not swallow it."""


class PermanentTaskError(TaskError):
    """A task that no retry can make succeed (its event fails the payload model, its result is not JSON): it fails
    at once, without using its other attempts. ``error_type`` goes into the failure record."""

    def __init__(self, error_type: str, message: str):
        self.error_type = error_type
        super().__init__(message)


class RequestError(GpufleetError):
    """A control-plane request that cannot be served as asked. ``code`` is stable and machine-readable; the HTTP
    API answers with ``status``."""

    status = 400

    def __init__(self, code: str, message: str):
        self.code = code
        self.message = message
        super().__init__(message)


class NotFoundError(RequestError):
    """No such task or function."""

    status = 404


class ConflictError(RequestError):
    """The task's state does not allow the operation (e.g. retrying a task that succeeded)."""

    status = 409


class InvalidRequestError(RequestError):
    """The request is malformed: a payload that fails the function's schema, a bad parameter."""

    status = 422


class PayloadTooLargeError(RequestError):
    status = 413


class NotReadyError(RequestError):
    """What the request needs is not there yet, e.g. no live worker runs the version asked for: try again later."""

    status = 503


class BodyTimeoutError(RequestError):
    """The request body did not arrive within ``api.body_timeout_s``."""

    status = 408


def unreachable_hint(server: str, setting: str, where: str | None = None) -> str:
    """What to check when ``server`` cannot be reached: usually it is not running, or the fleet points elsewhere
    (the variables ``gpufleet dev up`` prints were not exported)."""
    at = f" at {where}" if where else ""
    env = "GPUFLEET_" + setting.upper().replace(".", "__")
    return f'is {server} running{at}? Set {setting} (or {env}); for local servers: eval "$(gpufleet dev up)"'


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """A "did you mean 'x'?" hint for a misspelt key, scheme or name, or None."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f"did you mean {close[0]!r}?" if close else None
