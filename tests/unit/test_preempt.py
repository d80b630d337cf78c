"""The preemption notice, as each source gives it: a file that appears, and a URL that answers 404 until a notice is
out (as AWS's spot ``instance-action`` does), then 200; a real HTTP server on 127.0.0.1."""

from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from gpufleet.config import load_fleet
from gpufleet.errors import ConfigError
from gpufleet.worker import preempt
from gpufleet.worker.preempt import Notice

CONFIG = Path(__file__).parents[2] / "config" / "fleet.yaml"


def test_a_file_notice_is_out_once_the_file_is_there(tmp_path: Path) -> None:
    notice = Notice(f"file://{tmp_path / 'reclaimed'}")
    assert not notice.arrived() and not notice.on_sigterm
    (tmp_path / "reclaimed").touch()
    assert notice.arrived()
    assert not Notice(None).arrived() and Notice("sigterm").on_sigterm and not Notice("sigterm").arrived()


def test_a_url_notice_is_out_once_it_answers_200(monkeypatch: pytest.MonkeyPatch) -> None:
    status = {"code": 404}

    class Metadata(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status["code"])
            self.end_headers()
            self.wfile.write(b'{"action": "terminate"}' if status["code"] == 200 else b"")

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Metadata)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(preempt, "URL_EVERY_S", 0.0)  # ask at every look, not every 2 s
    try:
        notice = Notice(f"http://127.0.0.1:{server.server_port}/latest/meta-data/spot/instance-action")
        assert not notice.arrived()
        status["code"] = 200
        assert notice.arrived()
        assert not Notice("http://127.0.0.1:9/nothing-listens-here").arrived()
    finally:
        server.shutdown()


@pytest.mark.parametrize("bad", ["SIGTERM", "/run/preempt", "file://relative", "ftp://x"])
def test_a_notice_that_names_no_source_fails_at_load(bad: str) -> None:
    with pytest.raises(ConfigError, match="preempt_notice"):
        load_fleet(CONFIG, env={"GPUFLEET_WORKER__PREEMPT_NOTICE": bad})
