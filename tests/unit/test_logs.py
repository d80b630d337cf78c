"""Every line a gpufleet process writes is a log line: no colours in a file, warnings and a handler's print() as
structured lines, not loose text."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

from gpufleet.settings import LoggingSettings

CONFIGURE = "from gpufleet.logs import configure_logging; from gpufleet.settings import LoggingSettings; "


def test_the_console_format_has_no_colours_when_stderr_is_not_a_terminal() -> None:
    code = CONFIGURE + ("configure_logging(LoggingSettings(format='console')); import structlog; "
                        "structlog.get_logger('t').warning('plain', n=1)")  # fmt: skip
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert "plain" in err and "\x1b[" not in err


def test_auto_format_is_readable_on_a_terminal_and_json_in_a_pipe() -> None:
    """The default: a person at a terminal reads lines, a log shipper gets JSON; ``json`` forces JSON anywhere."""
    import os
    import pty

    def emit(fmt: str, on_tty: bool) -> str:
        code = CONFIGURE + (f"configure_logging(LoggingSettings(format={fmt!r})); import structlog; "
                            "structlog.get_logger('t').warning('ready', api='http://x')")  # fmt: skip
        if not on_tty:
            return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
        main, side = pty.openpty()
        try:
            subprocess.run([sys.executable, "-c", code], stderr=side, stdout=subprocess.DEVNULL, timeout=60)
            return os.read(main, 65536).decode()
        finally:
            os.close(main)
            os.close(side)

    assert LoggingSettings().format == "auto"
    on_tty = emit("auto", on_tty=True)
    assert "ready" in on_tty and "api" in on_tty and not on_tty.lstrip().startswith("{"), on_tty
    assert json.loads(emit("auto", on_tty=False))["event"] == "ready"
    assert json.loads(emit("json", on_tty=True).strip())["event"] == "ready"


def test_a_python_warning_is_one_json_line() -> None:
    code = CONFIGURE + ("configure_logging(LoggingSettings()); import warnings; "
                        "warnings.warn('first line\\nsecond line', RuntimeWarning)")  # fmt: skip
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    [line] = err.strip().splitlines()
    record = json.loads(line)
    assert record["logger"] == "py.warnings" and "first line\nsecond line" in record["event"]


def test_a_stop_signal_that_arrives_while_a_line_is_written_still_stops_the_process() -> None:
    # A Python signal handler runs in the main thread between two bytecodes: one that logged ("stopping") could
    # run inside structlog's write lock, held by the line being written, and wait on it for good. A dispatcher
    # without Redis, logging a retry as the SIGTERM came, ignored it that way (found by the suite, once per run).
    code = """if True:
        from gpufleet.logs import configure_logging
        from gpufleet.roles import stop_event_on_signals
        from gpufleet.settings import LoggingSettings
        import structlog
        configure_logging(LoggingSettings(format="json"))
        stop, log = stop_event_on_signals(), structlog.get_logger("busy")
        while not stop.is_set():
            log.info("a line being written while the signal comes", padding="x" * 2000)
        """
    for _ in range(10):  # each SIGTERM lands somewhere in a line being written: most did hang before
        proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
        assert proc.stderr is not None
        proc.stderr.read(1)  # it writes
        proc.send_signal(signal.SIGTERM)
        try:
            err = proc.communicate(timeout=20)[1]
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.communicate()
            raise AssertionError("the process did not stop within 20 s of SIGTERM") from None
        assert proc.returncode == 0 and b'"event":"stopping"' in err and b"Traceback" not in err, err[-2000:]
