"""The admin HTTP port: /metrics (Prometheus text), /healthz (the process is alive), /readyz (it can work).

Served by the standard library's WSGI server in its own threads, so a scrape never waits for the
event loop and a stuck loop cannot hide behind a healthy-looking scrape.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import structlog
from prometheus_client import make_wsgi_app

from adapter import metrics

log = structlog.get_logger("homeward.admin")

StartResponse = Callable[..., Any]


class _Server(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        """Scrapes every few seconds would drown the message log; Prometheus records its own."""


class AdminServer:
    """Runs in a background thread; `ready()` returns what stops the adapter from working ([] when ready)."""

    def __init__(self, host: str, port: int, ready: Callable[[], list[str]]):
        self.host = host
        self.requested_port = port
        self.ready = ready
        self._metrics_app = make_wsgi_app(metrics.REGISTRY)
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.server_address[1])

    def start(self) -> None:
        self._server = make_server(
            self.host, self.requested_port, self._app, server_class=_Server, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="admin-http", daemon=True)
        self._thread.start()
        log.info("admin.listening", host=self.host, port=self.port)

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def _app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics_app(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            return _text(start_response, "200 OK", "ok\n")
        if path == "/readyz":
            try:
                problems = self.ready()
            except Exception as exc:  # a failing check is a not-ready answer, not a 500
                problems = [f"readiness check failed ({type(exc).__name__})"]
            if problems:
                return _text(start_response, "503 Service Unavailable", "".join(f"{p}\n" for p in problems))
            return _text(start_response, "200 OK", "ready\n")
        return _text(start_response, "404 Not Found", "try /metrics, /healthz or /readyz\n")


def _text(start_response: StartResponse, status: str, body: str) -> list[bytes]:
    data = body.encode()
    start_response(status, [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(data)))])
    return [data]
