"""An HTTP worker: the standard library's threading HTTP server, fed by sticky_server."""

from __future__ import annotations

import os
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from sticky_server import Worker


class HelloHandler(BaseHTTPRequestHandler):
    server: WorkerHTTPServer

    def do_GET(self) -> None:
        body = f"worker {self.server.worker_id} pid {os.getpid()}\n".encode()
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


class HttpWorker(Worker):
    """Serves every connection the master routes here on a thread of its own."""

    def __init__(self, worker_id: int | None) -> None:
        # No bind, no listen: the master owns the listening socket.
        self.server = WorkerHTTPServer(("", 0), HelloHandler, bind_and_activate=False)
        self.server.worker_id = worker_id

    def add_connection(self, sock: socket.socket) -> None:
        self.server.process_request(sock, sock.getpeername())

    def stop(self) -> None:
        self.server.server_close()
