"""The HTTP listener of `-metrics`: `/metrics` for Prometheus and `/healthz` for load
balancers, probes and people.

`/healthz` answers 200 `ok` while the process is serving and 503 with a one-line reason
otherwise; what "serving" means is the caller's `health` function (agent/observe.py,
reconciler/observe.py). Standard library only (http.server), one short-lived thread per
request, a read timeout so that a client that never finishes its request cannot hold a
thread, and only GET and HEAD.
"""

from __future__ import annotations

import http.server
import logging
import socket
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from gleam import metrics as prometheus
from gleam.liveness import Health
from gleam.metrics import ListenError

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("gleam.health")

# Seconds a client may take to send its request.
REQUEST_TIMEOUT = 10.0
# Requests answered at once; more connections are closed at once, so that a flood of
# idle connections costs the daemon a few threads, not one each.
MAX_REQUESTS = 8


Metrics = Callable[[], tuple[bytes, str]]


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 64  # the listen backlog (socketserver's default is 5)
    metrics: Metrics
    health: Callable[[], Health]
    slots: threading.BoundedSemaphore

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False):
            self.shutdown_request(request)  # too many at once: drop this one
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.slots.release()


class _Handler(http.server.BaseHTTPRequestHandler):
    server: _Server
    timeout = REQUEST_TIMEOUT
    server_version = "gleam"

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/metrics":
                body, content_type = self.server.metrics()
                self._reply(200, body, content_type)
            elif path == "/healthz":
                health = self.server.health()
                text = (health.reason if health.ok else health.reason or "unhealthy") + "\n"
                self._reply(200 if health.ok else 503, text.encode(), "text/plain; charset=utf-8")
            else:
                self._reply(404, b"not found: try /metrics or /healthz\n", "text/plain")
        except Exception:  # noqa: BLE001 - one failed request must not end the listener
            log.exception("answering %s failed", path)
            self._reply(500, b"internal error\n", "text/plain")

    def do_HEAD(self) -> None:
        self.do_GET()

    def _reply(self, code: int, body: bytes, content_type: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class Listener:
    """Serves /metrics and /healthz on a thread of its own."""

    def __init__(
        self, address: tuple[str, int], *, metrics: Metrics, health: Callable[[], Health]
    ) -> None:
        host, port = address
        server_class = type(
            "_Server6" if ":" in host else "_Server4",
            (_Server,),
            {"address_family": socket.AF_INET6 if ":" in host else socket.AF_INET},
        )
        try:
            self._server = server_class((host, port), _Handler)
        except OSError as exc:
            where = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            why = exc.strerror or str(exc)
            raise ListenError(f"-metrics: cannot listen on {where}: {why}") from None
        self._server.metrics = metrics
        self._server.health = health
        self._server.slots = threading.BoundedSemaphore(MAX_REQUESTS)
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="gleam-metrics", daemon=True
        )
        self._started = False

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        shown = f"[{host}]" if ":" in str(host) else str(host)
        return f"http://{shown}:{port}"

    def start(self) -> None:
        self._thread.start()
        self._started = True
        log.info("serving %s/metrics and %s/healthz", self.url, self.url)

    def close(self) -> None:
        if self._started:
            self._server.shutdown()  # waits for serve_forever, which must be running
        self._server.server_close()
        self._thread.join(timeout=5)


def serve(
    address: tuple[str, int], registry: CollectorRegistry, *, health: Callable[[], Health]
) -> Listener:
    """Start a listener for `registry`'s metrics and `health`; raises ListenError."""
    listener = Listener(address, metrics=lambda: prometheus.exposition(registry), health=health)
    listener.start()
    return listener
