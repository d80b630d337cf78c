"""Structured logs with structlog: JSON, or readable lines on a terminal. Called by entry points only; importing
gpufleet configures nothing."""

from __future__ import annotations

import io
import logging
import sys
from typing import Any

import orjson
import structlog

from gpufleet.settings import LoggingSettings

CREDENTIAL_LOGGERS = ("botocore", "boto3", "s3transfer", "urllib3", "httpx", "httpcore", "kafka.conn")


def configure_logging(settings: LoggingSettings, **context: Any) -> None:
    """gpufleet's own lines go straight from structlog to stderr (the per-task path stays cheap); stdlib
    logging (Celery, kafka-python) is rendered by the same processors, so every line of a process looks alike.

    ``context`` (role, worker, gpu...) is bound to every line of this process.
    """
    level = getattr(logging, settings.level.upper())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    tty = sys.stderr.isatty()
    if settings.format == "json" or (settings.format == "auto" and not tty):
        renderer: Any = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        factory: Any = structlog.BytesLoggerFactory(sys.stderr.buffer)
    else:  # colours only for a terminal: in a file or a pipe they are noise
        renderer = structlog.dev.ConsoleRenderer(colors=tty)
        factory = structlog.PrintLoggerFactory(sys.stderr)
    structlog.configure(
        processors=[*shared, structlog.processors.format_exc_info, renderer],
        logger_factory=factory,
        wrapper_class=structlog.make_filtering_bound_logger(level),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    pre_chain = [*shared, structlog.stdlib.add_logger_name]
    processors = [structlog.stdlib.ProcessorFormatter.remove_processors_meta, _to_text(renderer)]
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(foreign_pre_chain=pre_chain, processors=processors))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # Python warnings (a library's multi-line notice) become one log line each, rendered like every other.
    logging.captureWarnings(True)
    # kafka-python is chatty at INFO about every connection and rebalance. Celery's per-task "received" and
    # "succeeded" lines repeat the runtime's own, and the first sits in the worker's dispatch path.
    for name in ("kafka", "celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    # At debug these print credentials: botocore the SigV4 Authorization header (access key id and signature) and
    # whole requests, urllib3 and httpx URLs with their query strings (presigned URLs, SNS tokens). Pinned, so
    # that `level: debug` never puts a secret in the logs.
    for name in CREDENTIAL_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(**context)


class PrintsToLog(io.TextIOBase):
    """Stands in for ``sys.stdout`` in a worker's pool process: each line a handler prints becomes a log line
    (``printed``), so the process's output stays one stream of structured lines."""

    def __init__(self) -> None:
        super().__init__()
        self._log = structlog.get_logger("gpufleet.handler")
        self._pending = ""

    def writable(self) -> bool:
        return True

    def write(self, text: str) -> int:
        *lines, self._pending = (self._pending + text).split("\n")
        for line in lines:
            self._log.info("printed", text=line[:4000])
        return len(text)

    def flush(self) -> None:
        if self._pending:
            self._log.info("printed", text=self._pending[:4000])
            self._pending = ""


def _to_text(renderer: Any) -> Any:
    """stdlib handlers write str; the JSON renderer makes bytes."""

    def render(logger: Any, name: str, event: Any) -> str:
        out = renderer(logger, name, event)
        return out.decode() if isinstance(out, bytes) else str(out)

    return render
