"""The HTTP control plane (``gpufleet api``): :func:`gpufleet.api.app.create_app` builds the FastAPI app over a
:class:`~gpufleet.control.plane.ControlPlane`; :func:`gpufleet.api.server.serve` runs it with uvicorn.

Importing this package imports neither FastAPI nor uvicorn.
"""

from __future__ import annotations

import errno
import socket
from typing import TYPE_CHECKING

from gpufleet.errors import PortInUseError

if TYPE_CHECKING:
    from gpufleet.config import Fleet


def check_port_free(fleet: Fleet) -> None:
    """Raise PortInUseError, before anything starts, if ``api.port`` is taken: a second ``gpufleet run`` or ``gpufleet
    api`` on this machine must not half-join the fleet and die later in a log line."""
    api = fleet.settings.api
    family = socket.AF_INET6 if ":" in api.host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds: TIME_WAIT is no conflict
        try:
            probe.bind((api.host, api.port))
        except OSError as exc:
            if exc.errno != errno.EADDRINUSE:
                return  # another cause (an address not on this machine): the api role reports it when it binds
            raise PortInUseError(
                f"api.port {api.port} on {api.host} is in use (is gpufleet already running here?); "
                "stop what holds it, or set api.port (GPUFLEET_API__PORT)"
            ) from None
