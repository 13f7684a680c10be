"""Serve a WSGI application (Flask, Django, Flask-SocketIO, python-socketio's ``socketio.WSGIApp``).

    sticky.work(WSGIWorker(app))

With gunicorn installed (``pip install 'sticky-server[wsgi]'``) each connection is
served the way gunicorn's threaded worker serves it, with gunicorn's own HTTP/1.1
request parser and WSGI environ (``gunicorn.http``), on a thread of its own:

- keep-alive: a connection waits up to ``keepalive`` seconds for each request (its
  first one too), then is closed; pipelined requests are answered in order;
- the raw socket is ``environ["gunicorn.socket"]``, where simple-websocket (and so
  Flask-SocketIO and python-socketio in threading mode) takes over a websocket;
- one access-log line per request on the ``sticky_server.access`` logger, at INFO;
- a request gunicorn's parser refuses gets 400 (414, 431 for the size limits), an
  application error before the response began gets 500, and is logged;
- ``REMOTE_ADDR`` is the real client (see ``connections.HandedOffSocket``); behind a
  forwarded header, gunicorn's ``forwarded_allow_ips`` is the StickyServer's trusted
  proxies, so ``X-Forwarded-Proto`` sets ``wsgi.url_scheme``.

There is one thread per open connection (a websocket holds its thread, as in
gunicorn's threaded worker and Flask-SocketIO's threading mode). Without gunicorn,
it falls back to ``wsgiref`` (``adapters.stdlib.WSGIWorker``: HTTP/1.0, no
keep-alive, no websockets) and says so once.

Stop: as every ``socketserver`` worker (``adapters.stdlib``): no new connection,
the read side of every connection is shut, so an idle keep-alive connection or a
websocket sees the end of the stream while a request in flight is answered.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import socket
import socketserver
import ssl
import threading
import time
from typing import Any

from ..checks import check_count, check_seconds
from ..server import StickyServer, trusted_forwarders
from ..worker.connections import unmapped
from .stdlib import SocketServerWorker
from .stdlib import WSGIWorker as WsgirefWorker

__all__ = ["DEFAULT_MAX_CONNECTIONS", "BodyTooLarge", "WSGIWorker", "gunicorn_available"]

logger = logging.getLogger("sticky_server.adapters.wsgi")
access_logger = logging.getLogger("sticky_server.access")

DEFAULT_KEEPALIVE = 5.0
# gunicorn's worker_connections: connections served at once, each on a thread of its own.
DEFAULT_MAX_CONNECTIONS = 1000

try:
    from gunicorn import util as gunicorn_util
    from gunicorn.config import Config as GunicornConfig
    from gunicorn.http import RequestParser
    from gunicorn.http import errors as http_errors
    from gunicorn.http import wsgi as gunicorn_wsgi
except ImportError:  # the core stays dependency-free: fall back to wsgiref
    gunicorn_available = False
else:
    gunicorn_available = True

# Refused requests: gunicorn's parse errors and the status each one gets.
_TOO_LONG = {"LimitRequestLine": (414, "Request-URI Too Long"), "LimitRequestHeaders": (431, "Headers Too Large")}


class WSGIWorker(SocketServerWorker):
    """A worker serving the WSGI ``app``: on gunicorn's HTTP/1.1 parser when installed, else ``wsgiref``.

    Its protections, as gunicorn's threaded worker has them:

    - ``keepalive``: a connection has this many seconds to send each request's whole
      head, the wait for it included (a client trickling a byte at a time is closed);
    - ``max_connections`` (gunicorn's ``worker_connections``): connections served at
      once, a thread each. Beyond it, connections wait for a thread in arrival order
      (no thread, no memory but their socket), a connection is not kept alive past its
      response while others wait, and on the kernel path the worker stops accepting, so
      new clients wait in the kernel's queue;
    - ``limit_request_line``, ``limit_request_fields``, ``limit_request_field_size``:
      gunicorn's head limits (414 / 431 / 400 beyond them);
    - ``max_body_size``: a request body over this many bytes is answered 413 (None:
      no limit, gunicorn's default);
    - a malformed request or body (bad chunk size, ...) is answered 400, and logged at DEBUG.
    """

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        keepalive: float = DEFAULT_KEEPALIVE,
        access_log: bool = True,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        limit_request_line: int | None = None,
        limit_request_fields: int | None = None,
        limit_request_field_size: int | None = None,
        max_body_size: int | None = None,
    ) -> None:
        keepalive = check_seconds("keepalive", keepalive, zero_allowed=False)
        check_count("max_connections", max_connections, minimum=1, maximum=1_000_000)
        if max_body_size is not None:
            check_count("max_body_size", max_body_size, minimum=0, maximum=2**63 - 1, what="a number of bytes")
        self._fallback: WsgirefWorker | None = None
        server: socketserver.BaseServer
        if gunicorn_available:
            limits = {
                "limit_request_line": limit_request_line,
                "limit_request_fields": limit_request_fields,
                "limit_request_field_size": limit_request_field_size,
            }
            server = _GunicornServer(
                app,
                keepalive,
                access_log,
                max_connections,
                {name: value for name, value in limits.items() if value is not None},
                max_body_size,
            )
        else:
            logger.warning(
                "gunicorn is not installed: serving WSGI with wsgiref (HTTP/1.0, no keep-alive, no websockets); "
                "pip install 'sticky-server[wsgi]' for HTTP/1.1 and websockets"
            )
            self._fallback = WsgirefWorker(app)
            server = self._fallback.server
        super().__init__(server, ssl_context, shutdown_timeout)

    def prepare(self, sock: socket.socket) -> None:
        if self._fallback is not None:
            self._fallback.prepare(sock)

    def close_each_response(self) -> bool:
        if isinstance(self.server, _GunicornServer):
            self.server.close_each_response = True
        return True  # (wsgiref's HTTP/1.0 serves one request per connection anyway)

    def has_room(self) -> bool:
        """Whether a new connection would get a thread now (the kernel path accepts only then)."""
        server = self.server
        return not isinstance(server, _GunicornServer) or server.has_room()


class _Connection(socketserver.BaseRequestHandler):
    """One connection: requests in order until the client or the app ends it (gthread's handle)."""

    server: _GunicornServer

    def handle(self) -> None:
        self.server.serve_connection(self.request, self.client_address)


class _GunicornServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """A socketserver without a socket: ``SocketServerWorker`` gives it each connection.

    At most ``max_connections`` threads; a connection beyond them waits in ``waiting``
    until a thread is done with its own, which then serves it.
    """

    daemon_threads = True

    def __init__(
        self,
        app: Any,
        keepalive: float,
        access_log: bool,
        max_connections: int = DEFAULT_MAX_CONNECTIONS,
        limits: dict[str, int] | None = None,
        max_body_size: int | None = None,
    ) -> None:
        super().__init__(("", 0), _Connection)
        self.app = app
        self.keepalive = keepalive
        self.access_log = access_log
        self.max_connections = max_connections
        self.max_body_size = max_body_size
        self.close_each_response = False  # route_by a named key: one request per connection
        self.serving = 0
        self.waiting: collections.deque[tuple[Any, Any]] = collections.deque()
        self.arrived: dict[Any, float] = {}  # waiting connections -> when they came
        self.lock = threading.Lock()
        self.cfg = GunicornConfig()
        for name, value in (limits or {}).items():
            self.cfg.set(name, value)
        sticky = StickyServer._current
        if sticky is not None:
            self.cfg.set("workers", sticky.workers)  # wsgi.multiprocess
        for header in ("x-forwarded-for", "forwarded"):
            trusted = trusted_forwarders(header)
            if trusted is not None:  # X-Forwarded-Proto and the like are believed from these peers
                self.cfg.set("forwarded_allow_ips", ",".join(trusted))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver's own prints to stderr
        logger.exception("error serving a connection from %s", client_address[0])

    def has_room(self) -> bool:
        return self.serving < self.max_connections

    def process_request(self, request: Any, client_address: Any) -> None:
        with self.lock:
            if self.serving >= self.max_connections:
                self.waiting.append((request, client_address))
                self.arrived[request] = time.monotonic()  # its head's deadline runs from now, not from its turn
                return
            self.serving += 1
        try:
            super().process_request(request, client_address)
        except BaseException:
            with self.lock:
                self.serving -= 1
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """Serve this connection, then each waiting one, on this thread, until none waits."""
        while True:
            super().process_request_thread(request, client_address)
            with self.lock:
                if not self.waiting:
                    self.serving -= 1
                    return
                request, client_address = self.waiting.popleft()

    def shutdown_request(self, request: Any) -> None:
        gunicorn_util.close_graceful(request)  # FIN first, so the last response is not cut by a reset

    def serve_connection(self, sock: socket.socket, client: tuple[str, int]) -> None:
        # gunicorn trusts forwarding headers from the proxy, the socket's own peer; the app sees the client.
        proxy = _kernel_peer(sock)
        local = sock.getsockname()
        server = local if isinstance(local, tuple) else (str(local), "")
        reader = _HeadDeadline(sock)
        parser = RequestParser(self.cfg, reader, proxy)
        with self.lock:
            since = self.arrived.pop(sock, None)
        while True:
            # The next request's whole head within keepalive seconds, the wait included: an idle
            # connection is closed, and so is one trickling its head a byte at a time.
            reader.deadline = (since if since is not None else time.monotonic()) + self.keepalive
            since = None
            try:
                request = next(parser)
            except (StopIteration, http_errors.NoMoreData, OSError):  # gone, idle too long, or a failed TLS handshake
                return
            except http_errors.ParseException as error:
                status, reason = _TOO_LONG.get(type(error).__name__, (400, "Bad Request"))
                logger.debug("refused a request from %s: %s", client[0], error)
                _write_error(sock, status, reason, str(error))
                return
            reader.deadline = None
            sock.settimeout(None)
            if self.max_body_size is not None and _too_large(request, self.max_body_size):
                _write_error(sock, 413, "Content Too Large", f"the body is over {self.max_body_size} bytes")
                return
            if not self._respond(request, sock, client, server) or self.waiting:
                return  # (with connections waiting for a thread, this one is not kept alive for its next request)

    def _respond(self, request: Any, sock: socket.socket, client: tuple[str, int], server: Any) -> bool:
        """Run the app for one request; whether the connection may carry another."""
        started = time.perf_counter()
        response = None
        result: Any = None
        try:
            response, environ = gunicorn_wsgi.create(request, sock, client, server, self.cfg)
            environ["wsgi.multithread"] = True
            if self.max_body_size is not None:
                environ["wsgi.input"] = _LimitedBody(environ["wsgi.input"], self.max_body_size)
            result = self.app(environ, _closing_on_request(response, self.close_each_response))
            if isinstance(result, environ["wsgi.file_wrapper"]):
                response.write_file(result)
            else:
                for chunk in result:
                    response.write(chunk)
            response.close()
        except StopIteration:  # simple-websocket's way of saying the connection was a websocket and is done
            return False
        except (http_errors.ParseException, BodyTooLarge) as error:  # the client's body, read by the app
            logger.debug("refused the body of %s %s from %s: %s", request.method, request.uri, client[0], error)
            if response is None or not response.headers_sent:
                status, reason = (413, "Content Too Large") if isinstance(error, BodyTooLarge) else (400, "Bad Request")
                _write_error(sock, status, reason, str(error))
            return False
        except http_errors.NoMoreData:  # the client left in the middle of its body
            return False
        except Exception as error:
            if not _client_gone(error):
                logger.exception("error handling %s %s from %s", request.method, request.uri, client[0])
                if response is None or not response.headers_sent:
                    _write_error(sock, 500, "Internal Server Error", "")
            return False
        finally:
            if result is not None and hasattr(result, "close"):
                try:
                    result.close()
                except Exception:
                    logger.exception("the WSGI response's close() raised")
            if self.access_log and response is not None and access_logger.isEnabledFor(logging.INFO):
                access_logger.info(
                    '%s - "%s %s HTTP/%d.%d" %s %d %.1fms',
                    client[0],
                    request.method,
                    request.uri,
                    *request.version,
                    (response.status or "-").split(" ", 1)[0],
                    response.sent,
                    (time.perf_counter() - started) * 1000,
                )
        return not response.should_close()


class BodyTooLarge(ValueError):
    """A request body went over ``max_body_size`` while the app read it."""


class _HeadDeadline:
    """The socket as gunicorn's parser reads it, each read waiting only until ``deadline``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.deadline: float | None = None

    def recv(self, size: int) -> bytes:
        if self.deadline is not None:
            left = self.deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("the request head did not arrive in time")
            self.sock.settimeout(left)
        return self.sock.recv(size)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.sock, name)


class _LimitedBody:
    """``wsgi.input`` that raises BodyTooLarge past ``limit`` bytes (a chunked body has no length to check first)."""

    def __init__(self, body: Any, limit: int) -> None:
        self._body = body
        self._left = limit

    def _count(self, data: bytes) -> bytes:
        self._left -= len(data)
        if self._left < 0:
            raise BodyTooLarge("the request body is too large")
        return data

    def read(self, size: int | None = None) -> bytes:
        return self._count(self._body.read(size))

    def readline(self, size: int | None = None) -> bytes:
        return self._count(self._body.readline(size))

    def readlines(self, hint: int | None = None) -> list[bytes]:
        return [self._count(line) for line in self._body.readlines(hint)]

    def __iter__(self) -> Any:
        for line in self._body:
            yield self._count(line)


def _too_large(request: Any, limit: int) -> bool:
    """Whether the request says its body is over ``limit`` bytes (Content-Length)."""
    for name, value in request.headers:
        if name == "CONTENT-LENGTH":
            try:
                return int(value) > limit
            except ValueError:
                return False
    return False


def _client_gone(error: BaseException) -> bool:
    """Whether ``error`` says the client left (as gunicorn's workers tell it), not that the app failed."""
    if isinstance(error, (TimeoutError, ssl.SSLError)):
        return True
    return isinstance(error, OSError) and error.errno in (errno.EPIPE, errno.ECONNRESET, errno.ENOTCONN)


def _kernel_peer(sock: socket.socket) -> Any:
    """The socket's own peer (the proxy, behind one), IPv4-mapped addresses un-mapped."""
    try:
        return unmapped(socket.socket.getpeername(sock))
    except OSError:
        return None


def _write_error(sock: socket.socket, status: int, reason: str, message: str) -> None:
    with contextlib.suppress(OSError):  # the client is gone
        gunicorn_util.write_error(sock, status, reason, message)


def _closing_on_request(response: Any, always: bool) -> Any:
    """``response.start_response``, and a ``Connection: close`` from the app (or ``always``) ends the connection.

    (gunicorn drops the hop-by-hop header without acting on it; engine.io under
    ``route_by="engineio"`` needs each polling connection to carry one session, and
    ``route_by`` a named key each request on a connection of its own.)
    """

    def start_response(status: str, headers: list[tuple[str, str]], exc_info: Any = None) -> Any:
        if always or any(name.lower() == "connection" and value.strip().lower() == "close" for name, value in headers):
            response.must_close = True
        return response.start_response(status, headers, exc_info)

    return start_response
