"""The master's stats in the Prometheus text format, on an admin address of their own.

    sticky-server app:Worker --metrics 127.0.0.1:9100      # GET /metrics, /stats, / (a status page)

Off by default. The endpoint is a small standard-library HTTP server on a thread
of the master; each scrape asks the master's loop for ``stats()``, so it never
touches the loop's state from another thread. Workers do not inherit its socket.
No dependency: the text format is simple enough to write directly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import socket
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from ..listener import Bind
from ..util.throttle import ThrottledLog
from .status_page import RecentProblems, StatusPage

__all__ = ["MAX_SCRAPES", "READ_TIMEOUT", "MetricsServer", "process_figures", "render"]

logger = logging.getLogger("sticky_server.metrics")

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A scraper gets this long in all to send its request and take the answer; then it is closed.
READ_TIMEOUT = 5.0
# At most this many scrapes are served at once; a connection beyond that is closed at once.
MAX_SCRAPES = 8
# A connection this old gives its place to a new one when every place is taken; the new one waits this long.
EVICT_AFTER = 0.5
EVICT_WAIT = 1.0
WATCH_INTERVAL = 0.25
REFUSED_LOG_INTERVAL = 10.0

# name, type, help, the stats key (per worker slot when the key is in the workers' entries)
_MASTER = [
    ("sticky_server_uptime_seconds", "gauge", "Seconds since the master started.", "uptime"),
    ("sticky_server_connections_accepted_total", "counter", "Connections the master accepted.", "accepted"),
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
    (
        "sticky_server_worker_descriptor_limit",
        "gauge",
        "The descriptor limit the slot's worker reported (0: none known).",
        "descriptor_limit",
    ),
    (
        "sticky_server_connections_moved_total",
        "counter",
        "Connections the slot's workers accepted and passed back to be routed by session (route_by).",
        "moved",
    ),
    (
        "sticky_server_messages_dropped_total",
        "counter",
        "Channel messages for the slot that never reached a worker (none then, or the oldest of a backlog).",
        "messages_dropped",
    ),
    (
        "sticky_server_connections_lost_no_room_total",
        "counter",
        "Connections the kernel closed because the slot's worker was at its descriptor limit.",
        "lost_no_room",
    ),
]
_PROCESS = [
    ("process_open_fds", "gauge", "Number of open file descriptors."),
    ("process_resident_memory_bytes", "gauge", "Resident memory size in bytes."),
    ("process_start_time_seconds", "gauge", "Start time of the process since the Unix epoch in seconds."),
]


def _number(value: Any) -> str:
    return (
        str(int(value)) if isinstance(value, bool) else repr(float(value)) if isinstance(value, float) else str(value)
    )


def process_figures(uptime: float) -> dict[str, float]:
    """The standard ``process_*`` figures of this process, as Prometheus client libraries name them.

    A figure this system cannot tell is left out.
    """
    figures: dict[str, float] = {"process_start_time_seconds": round(time.time() - uptime, 3)}
    for fd_dir in ("/proc/self/fd", "/dev/fd"):
        try:
            figures["process_open_fds"] = len(os.listdir(fd_dir)) - 1  # less the one listdir opened
            break
        except OSError:
            continue
    try:
        with open("/proc/self/statm") as statm:
            figures["process_resident_memory_bytes"] = int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        if sys.platform == "darwin":  # bytes there; the peak, the nearest figure the standard library gives
            figures["process_resident_memory_bytes"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return figures


def render(stats: dict[str, Any]) -> str:
    """``stats()`` (and this process's ``process_*`` figures) in the Prometheus text exposition format."""
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
    figures = process_figures(stats["uptime"])
    for name, kind, text in _PROCESS:
        if name in figures:
            lines += [f"# HELP {name} {text}", f"# TYPE {name} {kind}", f"{name} {_number(figures[name])}"]
    return "\n".join(lines) + "\n"


class _BoundedServer(ThreadingHTTPServer):
    """A thread per scrape, at most ``MAX_SCRAPES`` at once, each done within ``READ_TIMEOUT`` seconds in all.

    The limit is per scrape, not per read: a watchdog shuts any connection older than
    ``READ_TIMEOUT`` (a client trickling a byte at a time included). When every slot
    is taken, the oldest connection that has run for ``EVICT_AFTER`` seconds makes room
    for the new one (a real scrape takes milliseconds); with none that old, the new
    connection is closed unanswered.
    """

    daemon_threads = True
    request_queue_size = 128  # socketserver's 5 drops a burst's SYNs: each retried a second later

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        self.slots = threading.BoundedSemaphore(MAX_SCRAPES)
        self.active: dict[socket.socket, float] = {}  # connection -> when it was accepted
        self.active_lock = threading.Lock()
        self.closing = threading.Event()
        self.refused_log = ThrottledLog(
            logger,
            logging.WARNING,
            "metrics: closed %d connection(s) unanswered while %d scrapes were running (latest from %s)",
            REFUSED_LOG_INTERVAL,
        )
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self.slots.acquire(blocking=False) and not (
            self._evict_oldest() and self.slots.acquire(timeout=EVICT_WAIT)
        ):
            self.refused_log.note(1, MAX_SCRAPES, client_address[0])
            self.shutdown_request(request)
            return
        with self.active_lock:
            self.active[request] = time.monotonic()
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._done(request)
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._done(request)

    def _done(self, request: socket.socket) -> None:
        with self.active_lock:
            if self.active.pop(request, None) is None:
                return
        self.slots.release()

    def _evict_oldest(self) -> bool:
        now = time.monotonic()
        with self.active_lock:
            old = [(started, sock) for sock, started in self.active.items() if now - started >= EVICT_AFTER]
        if not old:
            return False
        _, oldest = min(old, key=lambda pair: pair[0])
        _cut(oldest)
        return True

    def watch_deadlines(self) -> None:
        """The watchdog: shut every connection that has had ``READ_TIMEOUT`` seconds."""
        while not self.closing.wait(WATCH_INTERVAL):
            now = time.monotonic()
            with self.active_lock:
                late = [sock for sock, started in self.active.items() if now - started >= READ_TIMEOUT]
            for sock in late:
                _cut(sock)


def _cut(sock: socket.socket) -> None:
    """End a scrape from another thread: its blocked read or write returns at once."""
    with contextlib.suppress(OSError):  # it has just finished
        sock.shutdown(socket.SHUT_RDWR)


def as_json(stats: dict[str, Any]) -> str:
    """``stats()`` as the JSON that ``sticky-server status`` prints."""
    return json.dumps(stats, indent=2, sort_keys=True) + "\n"


# Path: (content type, how the stats are written).
FORMATS: dict[str, tuple[str, Callable[[dict[str, Any]], str]]] = {
    "/metrics": (CONTENT_TYPE, render),
    "/stats": ("application/json", as_json),
}


class MetricsServer:
    """Serve ``render(stats())`` at ``/metrics`` and the stats as JSON at ``/stats``, on a daemon thread.

    Resource handling: each scrape has ``READ_TIMEOUT`` seconds for its request and
    answer, and at most ``MAX_SCRAPES`` run at once, so idle or slow connections to
    this port cost a bounded number of threads and descriptors. A scrape costs the
    master's loop one ``stats()`` call (at most a second's wait on this thread).
    """

    def __init__(self, bind: Bind, stats: Callable[[], dict[str, Any]]) -> None:
        if bind.path is not None:
            raise ValueError("the metrics endpoint listens on TCP (HOST:PORT), not on a Unix socket")
        self._problems = RecentProblems()
        logging.getLogger("sticky_server").addHandler(self._problems)
        page = StatusPage(self._problems)
        formats = {**FORMATS, "/": ("text/html; charset=utf-8", page.render)}

        class Handler(BaseHTTPRequestHandler):
            timeout = READ_TIMEOUT

            def do_GET(self) -> None:
                self._answer(with_body=True)

            def do_HEAD(self) -> None:
                self._answer(with_body=False)

            def _answer(self, with_body: bool) -> None:
                path = self.path.split("?")[0]
                if path not in formats:
                    self.send_error(404, "the status page is at /, the metrics at /metrics and /stats (JSON)")
                    return
                content_type, format_stats = formats[path]
                try:
                    body = format_stats(stats()).encode()
                except Exception:
                    logger.exception("could not collect the stats for a scrape")
                    self.send_error(503, "the master did not answer")
                    return
                self.send_response(200)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if with_body:
                    self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                logger.debug("%s %s", self.address_string(), format % args)

        self._server = _BoundedServer((bind.host or "", bind.port), Handler)
        self.address = self._server.server_address
        self._thread = threading.Thread(target=self._server.serve_forever, name="sticky-metrics", daemon=True)
        self._thread.start()
        self._watchdog = threading.Thread(
            target=self._server.watch_deadlines, name="sticky-metrics-deadlines", daemon=True
        )
        self._watchdog.start()

    def close(self) -> None:
        self._server.closing.set()
        self._server.shutdown()
        self._server.server_close()
        logging.getLogger("sticky_server").removeHandler(self._problems)
