"""The indexer process's own HTTP port: /health/live, /health/ready and /metrics.

`indexer_run` is not behind the web app, so a supervisor (systemd, Kubernetes) probes it directly:
live = the process answers; ready = the database answers, a source answered recently and this
process holds the writer lease (a standby is live but not ready, by design: one writer per chain).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from django.db import close_old_connections, connection
from prometheus_client import CONTENT_TYPE_LATEST

from fleetops.observability.views import metrics_exposition

log = logging.getLogger(__name__)

ReadyProbe = Callable[[], dict[str, str]]  # problems by name; empty when ready


class _Handler(BaseHTTPRequestHandler):
    server: HealthServer

    def log_message(self, format: str, *args: Any) -> None:
        return  # probes every few seconds would drown the log

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        self._send(status, json.dumps(payload).encode(), "application/json")

    def do_GET(self) -> None:
        path = self.path.split("?", 1)[0]
        try:
            if path == "/health/live":
                self._json(200, {"status": "ok"})
            elif path == "/health/ready":
                problems = self.server.ready_problems()
                if problems:
                    self._json(503, {"status": "unavailable", "problems": problems})
                else:
                    self._json(200, {"status": "ok"})
            elif path == "/metrics":
                self._send(200, self.server.metrics(), CONTENT_TYPE_LATEST)
            else:
                self._json(404, {"error": {"code": "not_found", "message": "no such path", "fields": {}}})
        finally:
            close_old_connections()  # this thread's own connection; never reuse a broken one


class HealthServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int, ready: ReadyProbe, host: str = "127.0.0.1"):
        super().__init__((host, port), _Handler)
        self._ready = ready

    def ready_problems(self) -> dict[str, str]:
        problems: dict[str, str] = {}
        try:
            with connection.cursor() as cursor:
                cursor.execute("SELECT 1")
        except Exception as exc:
            return {"database": f"unreachable: {exc.__class__.__name__}"}
        try:
            problems.update(self._ready())
        except Exception as exc:
            problems["indexer"] = f"check failed: {exc.__class__.__name__}"
        return problems

    def metrics(self) -> bytes:
        return metrics_exposition()

    def start(self) -> threading.Thread:
        thread = threading.Thread(target=self.serve_forever, name="indexer-health", daemon=True)
        thread.start()
        log.info("indexer health server on %s:%s", *self.server_address[:2])
        return thread
