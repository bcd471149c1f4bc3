"""The dispatcher's HTTP endpoints for Prometheus and the kubelet: ``/metrics``,
``/healthz`` (the process and its event loop are alive) and ``/readyz`` (brokers
connected, Job watches in sync). Served by the standard library's WSGI server on a thread
of its own, so a busy event loop cannot make a probe time out without cause.

The endpoints are unauthenticated: anyone who reaches the port reads them. So what
``/readyz`` says is decided by its caller (the operator tells counts only, see
``Operator.readiness``) and is passed through ``jobrunner.core.redaction.redact`` and cut to
``READY_TEXT_MAX`` characters here, whoever the caller."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

from prometheus_client import CollectorRegistry, make_wsgi_app

from jobrunner.core.redaction import redact

logger = logging.getLogger(__name__)

READY_TEXT_MAX = 4096
"""The most of ``/readyz``'s text served (a probe reads the status code only)."""

StartResponse = Callable[..., Any]


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("http: " + format, *args)


class Heartbeat:
    """Beaten by a task on the event loop; stale beats mean the loop is stuck."""

    def __init__(self, stale_after: float = 30.0) -> None:
        self.stale_after = stale_after
        self.last = time.monotonic()

    def beat(self) -> None:
        self.last = time.monotonic()

    def alive(self) -> bool:
        return time.monotonic() - self.last < self.stale_after


class HttpEndpoints:
    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        heartbeat: Heartbeat,
        ready: Callable[[], tuple[bool, str]],
    ) -> None:
        self._metrics = make_wsgi_app(registry)
        self._heartbeat = heartbeat
        self._ready = ready
        self._server: WSGIServer | None = None
        self._thread: threading.Thread | None = None

    def app(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/metrics":
            return self._metrics(environ, start_response)  # type: ignore[no-any-return]
        if path == "/healthz":
            ok = self._heartbeat.alive()
            return _text(start_response, ok, "ok\n" if ok else "event loop stalled\n")
        if path == "/readyz":
            ok, detail = self._ready()
            return _text(start_response, ok, redact(detail)[:READY_TEXT_MAX] + "\n")
        start_response("404 Not Found", [("Content-Type", "text/plain")])
        return [b"not found\n"]

    def start(self, host: str, port: int) -> int:
        self._server = make_server(
            host, port, self.app, _ThreadingServer, handler_class=_QuietHandler
        )
        self._thread = threading.Thread(target=self._server.serve_forever, name="http", daemon=True)
        self._thread.start()
        bound = int(self._server.server_port)
        logger.info("serving /metrics, /healthz and /readyz on %s:%d", host, bound)
        return bound

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()


def _text(start_response: StartResponse, ok: bool, body: str) -> list[bytes]:
    start_response("200 OK" if ok else "503 Service Unavailable", [("Content-Type", "text/plain")])
    return [body.encode()]
