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

import contextlib
import errno
import logging
import socket
import socketserver
import ssl
import time
from typing import Any

from ..connections import unmapped
from ..server import StickyServer, trusted_forwarders
from .stdlib import SocketServerWorker
from .stdlib import WSGIWorker as WsgirefWorker

__all__ = ["WSGIWorker", "gunicorn_available"]

logger = logging.getLogger("sticky_server.adapters.wsgi")
access_logger = logging.getLogger("sticky_server.access")

DEFAULT_KEEPALIVE = 5.0

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
    """A worker serving the WSGI ``app``: on gunicorn's HTTP/1.1 parser when installed, else ``wsgiref``."""

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        keepalive: float = DEFAULT_KEEPALIVE,
        access_log: bool = True,
    ) -> None:
        if isinstance(keepalive, bool) or not isinstance(keepalive, (int, float)) or keepalive <= 0:
            raise ValueError(f"keepalive must be a number of seconds above 0; got {keepalive!r}")
        self._fallback: WsgirefWorker | None = None
        server: socketserver.BaseServer
        if gunicorn_available:
            server = _GunicornServer(app, float(keepalive), access_log)
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


class _Connection(socketserver.BaseRequestHandler):
    """One connection: requests in order until the client or the app ends it (gthread's handle)."""

    server: _GunicornServer

    def handle(self) -> None:
        self.server.serve_connection(self.request, self.client_address)


class _GunicornServer(socketserver.ThreadingMixIn, socketserver.BaseServer):
    """A socketserver without a socket: ``SocketServerWorker`` gives it each connection."""

    daemon_threads = True

    def __init__(self, app: Any, keepalive: float, access_log: bool) -> None:
        super().__init__(("", 0), _Connection)
        self.app = app
        self.keepalive = keepalive
        self.access_log = access_log
        self.cfg = GunicornConfig()
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

    def shutdown_request(self, request: Any) -> None:
        gunicorn_util.close_graceful(request)  # FIN first, so the last response is not cut by a reset

    def serve_connection(self, sock: socket.socket, client: tuple[str, int]) -> None:
        # gunicorn trusts forwarding headers from the proxy, the socket's own peer; the app sees the client.
        proxy = _kernel_peer(sock)
        local = sock.getsockname()
        server = local if isinstance(local, tuple) else (str(local), "")
        parser = RequestParser(self.cfg, sock, proxy)
        while True:
            sock.settimeout(self.keepalive)  # waiting for a request: an idle connection is closed
            try:
                request = next(parser)
            except (StopIteration, http_errors.NoMoreData, OSError):  # gone, idle too long, or a failed TLS handshake
                return
            except http_errors.ParseException as error:
                status, reason = _TOO_LONG.get(type(error).__name__, (400, "Bad Request"))
                logger.debug("refused a request from %s: %s", client[0], error)
                _write_error(sock, status, reason, str(error))
                return
            sock.settimeout(None)
            if not self._respond(request, sock, client, server):
                return

    def _respond(self, request: Any, sock: socket.socket, client: tuple[str, int], server: Any) -> bool:
        """Run the app for one request; whether the connection may carry another."""
        started = time.perf_counter()
        response = None
        result: Any = None
        try:
            response, environ = gunicorn_wsgi.create(request, sock, client, server, self.cfg)
            environ["wsgi.multithread"] = True
            result = self.app(environ, response.start_response)
            if isinstance(result, environ["wsgi.file_wrapper"]):
                response.write_file(result)
            else:
                for chunk in result:
                    response.write(chunk)
            response.close()
        except StopIteration:  # simple-websocket's way of saying the connection was a websocket and is done
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
