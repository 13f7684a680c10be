"""Serve a tornado application: ``sticky.work(TornadoWorker(app))``.

``app`` is a ``tornado.web.Application`` (or any request callback an
``HTTPServer`` takes); keyword options go to ``HTTPServer`` (``xheaders=``,
``max_buffer_size=``, ...). Each connection becomes an ``IOStream`` (an
``SSLIOStream`` with ``ssl_context``) given to ``HTTPServer.handle_stream``, on
the worker's event loop, which is tornado's IOLoop.

Stop: idle keep-alive connections close at once, requests in flight get up to
``shutdown_timeout`` seconds (default: the time the master still allows), then
the rest close. Like tornado's own ``close_all_connections``, this does not close
websockets: close them in a ``stop`` of your own subclass, before calling ours.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from ._extras import missing_extra

try:
    from tornado import httputil
    from tornado.httpserver import HTTPServer
    from tornado.iostream import IOStream, SSLIOStream
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "tornado") from exc

from ..worker.base import AsyncWorker
from ..worker.connections import client_address
from ._stopping import shutdown_budget

__all__ = ["TornadoWorker"]

# How often stop() looks whether the requests in flight are done.
_POLL_SECONDS = 0.05


class _BusyTracking(httputil.HTTPMessageDelegate):
    """Marks a connection busy from a request's headers until the server waits for its next request."""

    def __init__(self, delegate: httputil.HTTPMessageDelegate, connection: object, busy: set[object]) -> None:
        self._delegate = delegate
        self._connection = connection
        self._busy = busy

    def headers_received(
        self, start_line: httputil.RequestStartLine | httputil.ResponseStartLine, headers: httputil.HTTPHeaders
    ) -> Any:
        self._busy.add(self._connection)
        return self._delegate.headers_received(start_line, headers)

    def data_received(self, chunk: bytes) -> Any:
        return self._delegate.data_received(chunk)

    def finish(self) -> None:
        self._delegate.finish()

    def on_connection_close(self) -> None:
        self._busy.discard(self._connection)
        self._delegate.on_connection_close()


class _TrackedHTTPServer(HTTPServer):
    """tornado's HTTPServer, knowing which connections are in the middle of a request."""

    busy: set[object]

    def start_request(self, server_conn: object, request_conn: httputil.HTTPConnection) -> httputil.HTTPMessageDelegate:
        # Called when a connection starts waiting for its next request: it is idle from here.
        self.busy.discard(server_conn)
        return _BusyTracking(super().start_request(server_conn, request_conn), server_conn, self.busy)


class TornadoWorker(AsyncWorker):
    """A worker that serves ``app`` with tornado's ``HTTPServer``."""

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        **server_options: Any,
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self._server_options = server_options
        self.server: _TrackedHTTPServer | None = None
        self._stopping = False

    def close_each_response(self) -> bool:
        self._server_options["no_keep_alive"] = True
        return True

    async def start(self) -> None:
        # Built on the running loop: tornado binds its IOLoop to it.
        self.server = _TrackedHTTPServer(self.app, ssl_options=self.ssl_context, **self._server_options)
        self.server.busy = set()

    async def add_connection(self, sock: socket.socket) -> None:
        server = self.server
        if server is None or self._stopping:
            sock.close()
            return
        address = client_address(sock)
        stream: IOStream
        if self.ssl_context is not None:
            wrapped = self.ssl_context.wrap_socket(sock, server_side=True, do_handshake_on_connect=False)
            stream = SSLIOStream(wrapped, max_buffer_size=server.max_buffer_size)
        else:
            stream = IOStream(sock, max_buffer_size=server.max_buffer_size)
        server.handle_stream(stream, address)

    async def stop(self) -> None:
        server = self.server
        if server is None:
            return
        self._stopping = True
        # tornado keeps the HTTP connections it serves in _connections (websockets leave it on upgrade).
        connections: set[Any] = getattr(server, "_connections", set())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + shutdown_budget(self.shutdown_timeout)
        while connections:
            server.busy &= connections
            for connection in list(connections - server.busy):
                await connection.close()
            if not connections or loop.time() >= deadline:
                break
            await asyncio.sleep(_POLL_SECONDS)
        await server.close_all_connections()
