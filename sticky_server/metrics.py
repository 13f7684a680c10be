"""The master's stats in the Prometheus text format, on an admin address of their own.

    sticky-server app:Worker --metrics 127.0.0.1:9100      # GET /metrics

Off by default. The endpoint is a small standard-library HTTP server on a thread
of the master; each scrape asks the master's loop for ``stats()``, so it never
touches the loop's state from another thread. Workers do not inherit its socket.
No dependency: the text format is simple enough to write directly.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from .listener import Bind

__all__ = ["MetricsServer", "render"]

logger = logging.getLogger("sticky_server.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# name, type, help, the stats key (per worker slot when the key is in the workers' entries)
_MASTER = [
    ("sticky_server_uptime_seconds", "gauge", "Seconds since the master started.", "uptime"),
    ("sticky_server_connections_accepted_total", "counter", "Connections the master accepted.", "accepted"),
    ("sticky_server_handoff_rate", "gauge", "Hand-offs per second since the previous scrape.", "handoff_rate"),
]
_PER_WORKER = [
    ("sticky_server_worker_up", "gauge", "1 when the slot's worker is ready.", "ready"),
    ("sticky_server_worker_uptime_seconds", "gauge", "Seconds the slot's current worker has run.", "uptime"),
    (
        "sticky_server_connections_handed_off_total",
        "counter",
        "Connections the slot's workers took.",
        "handed_off",
    ),
    ("sticky_server_connections_live", "gauge", "Connections of the slot not yet seen closed.", "live"),
    ("sticky_server_worker_restarts_total", "counter", "Unexpected exits of the slot's workers.", "restarts"),
]


def _number(value: Any) -> str:
    return (
        str(int(value)) if isinstance(value, bool) else repr(float(value)) if isinstance(value, float) else str(value)
    )


def render(stats: dict[str, Any]) -> str:
    """``stats()`` in the Prometheus text exposition format."""
    lines: list[str] = []
    for name, kind, text, key in _MASTER:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_number(stats[key])}"]
    lines += [
        "# HELP sticky_server_workers Worker slots.",
        "# TYPE sticky_server_workers gauge",
        f"sticky_server_workers {len(stats['workers'])}",
    ]
    for name, kind, text, key in _PER_WORKER:
        lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}"]
        for worker in stats["workers"]:
            lines.append(f'{name}{{slot="{worker["slot"]}"}} {_number(worker[key])}')
    return "\n".join(lines) + "\n"


class MetricsServer:
    """Serve ``render(stats())`` at ``/metrics`` on ``bind`` (TCP), on a daemon thread, until ``close()``."""

    def __init__(self, bind: Bind, stats: Callable[[], dict[str, Any]]) -> None:
        if bind.path is not None:
            raise ValueError("the metrics endpoint listens on TCP (HOST:PORT), not on a Unix socket")

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if self.path.split("?")[0] != "/metrics":
                    self.send_error(404, "the metrics are at /metrics")
                    return
                try:
                    body = render(stats()).encode()
                except Exception:
                    logger.exception("could not collect the stats for a scrape")
                    self.send_error(503, "the master did not answer")
                    return
                self.send_response(200)
                self.send_header("Content-Type", CONTENT_TYPE)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("%s %s", self.address_string(), format % args)

        self._server = ThreadingHTTPServer((bind.host or "", bind.port), Handler)
        self._server.daemon_threads = True
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="sticky-metrics", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
