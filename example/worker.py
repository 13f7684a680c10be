"""An HTTP worker: the standard library's threading HTTP server, fed by sticky_server.

It also shows the channel: every connection it takes is reported to the master,
and the page shows the totals of all workers that the master broadcasts.
"""

from __future__ import annotations

import json
import os
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from sticky_server import StickyServer, Worker


class HelloHandler(BaseHTTPRequestHandler):
    server: WorkerHTTPServer

    def do_GET(self) -> None:
        with self.server.totals_lock:
            totals = dict(self.server.totals)
        body = (
            f"worker {self.server.worker_id} pid {os.getpid()}\n"
            f"connections per worker: {json.dumps(totals, sort_keys=True)}\n"
        ).encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: one line per request would drown the server's own log."""


class WorkerHTTPServer(ThreadingHTTPServer):
    worker_id: int | None = None
    # Non-daemon request threads, so that server_close() in stop() waits for them:
    # a stopping worker finishes the requests it has.
    daemon_threads = False

    def __init__(self) -> None:
        super().__init__(("", 0), HelloHandler, bind_and_activate=False)  # no bind: the master listens
        self.totals: dict[str, int] = {}
        self.totals_lock = threading.Lock()


class HttpWorker(Worker):
    """Serves every connection the master routes here on a thread of its own."""

    def __init__(self, sticky: StickyServer) -> None:
        self.sticky = sticky
        self.server = WorkerHTTPServer()
        self.server.worker_id = sticky.worker_id
        sticky.on_message(self.on_message)

    def add_connection(self, sock: socket.socket) -> None:
        self.sticky.send({"connections": 1})  # never blocks; the master adds it up
        self.server.process_request(sock, sock.getpeername())

    def on_message(self, sender: int | None, message: Any) -> None:
        if sender is None and "totals" in message:  # from the master
            with self.server.totals_lock:
                self.server.totals = message["totals"]

    def stop(self) -> None:
        self.server.server_close()
