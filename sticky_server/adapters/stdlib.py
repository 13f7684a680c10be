"""Serve with the standard library: any ``socketserver`` server, ``http.server`` handlers, WSGI apps.

    from http.server import ThreadingHTTPServer
    sticky.work(SocketServerWorker(ThreadingHTTPServer(("", 0), MyHandler, bind_and_activate=False)))
    sticky.work(HTTPWorker(MyHandler))          # the same, built for you
    sticky.work(WSGIWorker(wsgi_app))           # wsgiref, one thread per connection

Each connection goes to ``server.process_request(sock, client_address)``, the call
``serve_forever`` makes after ``accept``; so a ``ThreadingMixIn`` server serves it
on a thread of its own (a server without one serves connections one at a time, on
the thread that runs ``work()``). The server's own unbound socket is closed here:
the master owns the listening socket.

TLS: pass ``ssl_context``; each socket is wrapped server-side and the handshake
happens on the connection's thread, at its first read.

Stop: no new connection is taken; every live connection has its read side shut
down, so a handler waiting for another keep-alive request sees the end of the
stream while a request already received is answered; then ``stop()`` waits for
the handlers to return, for at most ``shutdown_timeout`` seconds (default: the
time the master still allows, see ``time_left_to_stop``). On macOS, shutting the
read side may discard bytes that had arrived but were not yet read.

wsgiref speaks HTTP/1.0 with one request per connection: no keep-alive.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import socketserver
import ssl
import time
import weakref
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

from ..worker.base import Worker
from ..worker.connections import client_address
from ._stopping import shutdown_budget

__all__ = ["HTTPWorker", "SocketServerWorker", "WSGIWorker"]

logger = logging.getLogger("sticky_server.adapters.stdlib")

# How often stop() looks whether the handlers are done.
_POLL_SECONDS = 0.05


class SocketServerWorker(Worker):
    """A worker that gives each connection to a ``socketserver`` server built with ``bind_and_activate=False``."""

    def __init__(
        self,
        server: socketserver.BaseServer,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        own_socket = getattr(server, "socket", None)
        if isinstance(own_socket, socket.socket):
            own_socket.close()  # unbound and never used: the master listens
        self.server = server
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        # Weak: a connection whose handler has returned drops out with no per-connection pruning.
        self._live: weakref.WeakSet[socket.socket] = weakref.WeakSet()
        self._stopping = False

    def add_connection(self, sock: socket.socket) -> None:
        if self._stopping:
            sock.close()
            return
        try:
            address = client_address(sock)
        except OSError:  # the client already left
            sock.close()
            return
        if self.ssl_context is not None:
            sock = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
        self._live.add(sock)
        self.prepare(sock)
        self.server.process_request(sock, address)

    def prepare(self, sock: socket.socket) -> None:
        """Called before each connection is served; a hook for subclasses."""

    def stop(self) -> None:
        self._stopping = True
        live = [sock for sock in self._live if sock.fileno() != -1]
        for sock in live:
            # Closed by its handler meanwhile, or the client is gone: nothing to do.
            with contextlib.suppress(OSError):
                # socket.socket's own shutdown: SSLSocket.shutdown would also drop the TLS session.
                socket.socket.shutdown(sock, socket.SHUT_RD)
        deadline = time.monotonic() + shutdown_budget(self.shutdown_timeout)
        while any(sock.fileno() != -1 for sock in live):
            if time.monotonic() >= deadline:
                busy = sum(sock.fileno() != -1 for sock in live)
                logger.warning("stopping with %d connection(s) still being served", busy)
                return  # the handler threads end with the process
            time.sleep(_POLL_SECONDS)
        self.server.server_close()  # joins the handler threads, which have all returned


class HTTPWorker(SocketServerWorker):
    """``http.server`` with ``handler_class`` (a ``BaseHTTPRequestHandler``), one thread per connection."""

    def __init__(
        self,
        handler_class: type[BaseHTTPRequestHandler],
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
    ) -> None:
        server = ThreadingHTTPServer(("", 0), handler_class, bind_and_activate=False)
        server.daemon_threads = True
        super().__init__(server, ssl_context, shutdown_timeout)

    def close_each_response(self) -> bool:
        server: Any = self.server
        server.RequestHandlerClass = _closing_each_response(server.RequestHandlerClass)
        return True


def _closing_each_response(handler_class: type[BaseHTTPRequestHandler]) -> type[BaseHTTPRequestHandler]:
    """``handler_class``, answering one request per connection, each response saying ``Connection: close``."""

    class ClosingEachResponse(handler_class):  # type: ignore[valid-type,misc]
        def end_headers(self) -> None:
            if not self.close_connection:
                self.send_header("Connection", "close")  # (and so close_connection)
            super().end_headers()

        def handle(self) -> None:
            self.close_connection = True
            self.handle_one_request()

    ClosingEachResponse.__name__ = ClosingEachResponse.__qualname__ = handler_class.__name__
    return ClosingEachResponse


class _QuietWSGIRequestHandler(WSGIRequestHandler):
    """wsgiref's handler, with its per-request line on the logging tree (DEBUG) instead of stderr."""

    def log_message(self, format: str, *args: Any) -> None:
        logger.debug("%s %s", self.address_string(), format % args)


class _ThreadingWSGIServer(socketserver.ThreadingMixIn, WSGIServer):
    daemon_threads = True


class WSGIWorker(SocketServerWorker):
    """A WSGI application on ``wsgiref``, one thread per connection (HTTP/1.0, no keep-alive)."""

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        handler_class: type[WSGIRequestHandler] = _QuietWSGIRequestHandler,
    ) -> None:
        server = _ThreadingWSGIServer(("", 0), handler_class, bind_and_activate=False)
        server.set_app(app)
        self._environ_ready = False
        super().__init__(server, ssl_context, shutdown_timeout)

    def close_each_response(self) -> bool:
        return True  # wsgiref's HTTP/1.0 serves one request per connection

    def prepare(self, sock: socket.socket) -> None:
        if self._environ_ready:
            return
        # WSGI's SERVER_NAME and SERVER_PORT: the address clients connect to, known from the first one.
        server: Any = self.server
        local = sock.getsockname()
        server.server_name, server.server_port = (local[0], local[1]) if isinstance(local, tuple) else (local, 0)
        server.setup_environ()
        self._environ_ready = True
