"""``gpufleet api``: the control plane's HTTP server, uvicorn on ``api.host:api.port``.

Signals belong to the CLI entry point: it sets ``stop`` on SIGINT/SIGTERM, and the server, which installs no
handlers of its own, stops accepting connections, lets requests in flight finish (up to ``GRACE_S``) and returns.
uvicorn's own log lines go through the process's logging setup (structlog), warnings and errors only; requests
are logged at debug by :class:`gpufleet.api.errors.Observe`.
"""

from __future__ import annotations

import contextlib
import socket
import threading
from collections.abc import Generator

import structlog
import uvicorn

from gpufleet.api import check_port_free
from gpufleet.api.app import create_app
from gpufleet.api.protocol import guarded_protocol
from gpufleet.config import Fleet
from gpufleet.control.plane import ControlPlane
from gpufleet.triggers import backend, served_by
from gpufleet.triggers.webhook import WebhookTrigger

log = structlog.get_logger("gpufleet.api")
GRACE_S = 10


def serve(fleet: Fleet, stop: threading.Event) -> None:
    """Serve the API until ``stop`` is set, then shut down cleanly.

    Raises:
        ConfigError: ``api.token`` is not set.
    """
    api = fleet.settings.api
    token = api.require_token(str(fleet.config_file))
    check_port_free(fleet)
    control = ControlPlane(fleet)
    webhooks: list[WebhookTrigger] = [
        backend(t.scheme)(fleet, t) for t in fleet.triggers.values() if t.enabled and served_by(t.scheme) == "api"
    ]
    for hook in webhooks:
        log.info("webhook trigger served", trigger=hook.name, path=f"/v1/webhooks/{hook.path}")
    config = uvicorn.Config(
        create_app(control, token, webhooks),
        host=api.host,
        port=api.port,
        log_config=None,
        log_level="warning",
        access_log=False,
        lifespan="off",
        server_header=False,
        timeout_graceful_shutdown=GRACE_S,
        # Slow clients: a header timeout and a cap per address here, api.max_connections requests at once in the
        # app (RequestLimit). With api.body_timeout_s, stalled clients hold at most max_connections bodies of at
        # most max_payload_bytes, for at most that long.
        http=guarded_protocol(api.header_timeout_s, api.max_connections_per_client),
    )
    try:
        _Server(config, stop).run()
    finally:
        for hook in webhooks:
            hook.close()
    log.info("api stopped")


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, stop: threading.Event) -> None:
        super().__init__(config)
        self._stop = stop

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        # uvicorn would install SIGINT/SIGTERM handlers (and re-raise the signal on exit); the CLI owns them.
        yield

    async def on_tick(self, counter: int) -> bool:
        if self._stop.is_set():  # checked every 0.1 s by uvicorn's main loop
            self.should_exit = True
        return await super().on_tick(counter)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            log.info("api listening", url=f"http://{f'[{host}]' if ':' in host else host}:{port}")
