"""Serve an ASGI application with uvicorn: ``sticky.work(ASGIWorker(app))``.

Keyword options go to ``uvicorn.Config`` (``http=``, ``ws=``, ``lifespan=``,
``proxy_headers=``, ``limit_concurrency=``, ...); uvicorn's own binding options
do nothing here (the master listens). TLS: pass ``ssl_context``, or uvicorn's
``ssl_certfile``/``ssl_keyfile``.

It is uvicorn's ``Server`` with the listening part left out: ``start`` runs the
lifespan startup and uvicorn's ``main_loop`` (the Date header, once a second),
each connection gets ``config.http_protocol_class`` through
``loop.connect_accepted_socket``, and ``stop`` is uvicorn's own shutdown: idle
connections close, responses in flight get up to ``shutdown_timeout`` seconds
(default: the time the master still allows), then the lifespan shutdown runs.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from ._extras import missing_extra

try:
    import uvicorn
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "asgi") from exc

from ..server import trusted_forwarders
from ..worker.base import AsyncWorker
from ._stopping import shutdown_budget

__all__ = ["PROCESS_OPTIONS", "ASGIWorker"]


class _HandedOffServer(uvicorn.Server):
    """uvicorn's server, serving sockets it is given instead of listening."""

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await self.lifespan.startup()
        if self.lifespan.should_exit:
            raise RuntimeError("the ASGI application's lifespan startup failed (its error is logged above)")
        self.servers = []
        self.started = True

    def create_protocol(self) -> asyncio.Protocol:
        protocol: asyncio.Protocol = self.config.http_protocol_class(  # type: ignore[call-arg]
            config=self.config, server_state=self.server_state, app_state=self.lifespan.state
        )
        return protocol


class _ClosingEachResponse:
    """ASGI middleware: every HTTP response says ``Connection: close`` (uvicorn then ends the connection)."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def closing(message: Any) -> None:
            if message["type"] == "http.response.start":
                headers = [(name, value) for name, value in message.get("headers", ()) if name.lower() != b"connection"]
                message = {**message, "headers": [*headers, (b"connection", b"close")]}
            await send(message)

        await self.app(scope, receive, closing)


# uvicorn options that assume uvicorn owns the process or the listening socket, and what
# does their job here. Every other uvicorn.Config option applies to each connection and is
# honoured (root_path, timeout_keep_alive, limit_concurrency, ws*, lifespan, http, headers...).
PROCESS_OPTIONS = {
    "host": "the master listens: StickyServer.listen(port, host) or --bind",
    "port": "the master listens: StickyServer.listen(port, host) or --bind",
    "uds": "the master listens: StickyServer.listen_on(['unix:/PATH']) or --bind unix:/PATH",
    "fd": "the master listens: give it the address to bind",
    "backlog": "StickyServer(backlog=N) or --backlog",
    "workers": "StickyServer(workers=N) or --workers",
    "reload": "send the master SIGHUP: a zero-downtime reload that keeps every client on its slot",
    "reload_dirs": "send the master SIGHUP to reload",
    "reload_delay": "send the master SIGHUP to reload",
    "reload_includes": "send the master SIGHUP to reload",
    "reload_excludes": "send the master SIGHUP to reload",
    "limit_max_requests": "StickyServer(max_connections_per_worker=N) recycles a worker without dropping a client",
    "limit_max_requests_jitter": "max_connections_per_worker adds up to 10% of jitter itself",
    "timeout_notify": "the master's heartbeat: StickyServer(timeout=...) or --timeout",
    "callback_notify": "the master's heartbeat: StickyServer(timeout=...) or --timeout",
    "timeout_worker_healthcheck": "the master's heartbeat: StickyServer(timeout=...) or --timeout",
    "timeout_graceful_shutdown": "ASGIWorker(app, shutdown_timeout=...) or StickyServer(graceful_timeout=...)",
}


def _trusting_the_proxies(config: dict[str, Any]) -> dict[str, Any]:
    """uvicorn's proxy-header options, set from the StickyServer's trusted proxies unless given.

    Behind ``forwarded_header="x-forwarded-for"`` the peer uvicorn sees is the
    proxy, and uvicorn's own middleware reads each request's X-Forwarded-For and
    X-Forwarded-Proto when that peer is in ``forwarded_allow_ips``.
    """
    trusted = trusted_forwarders("x-forwarded-for")
    if trusted is None:
        return config
    return {"proxy_headers": True, "forwarded_allow_ips": trusted, **config}


class ASGIWorker(AsyncWorker):
    """A worker that serves the ASGI application ``app`` with uvicorn's protocols.

    ``config`` is passed to ``uvicorn.Config``; the options in ``PROCESS_OPTIONS``,
    which assume uvicorn owns the process, are refused with what to use instead.
    """

    # uvicorn reads this header itself, request by request: leave the proxy as the socket's peer.
    forwarded_headers_read = frozenset({"x-forwarded-for"})

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        **config: Any,
    ) -> None:
        refused = [f"{name}: {PROCESS_OPTIONS[name]}" for name in config if name in PROCESS_OPTIONS]
        if refused:
            raise TypeError(
                "ASGIWorker does not take uvicorn options that assume uvicorn owns the process; " + "; ".join(refused)
            )
        self.config = uvicorn.Config(app, **_trusting_the_proxies(config))
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self.server = _HandedOffServer(self.config)
        self._ticker: asyncio.Task[None] | None = None
        self._closing_each_response = False

    def close_each_response(self) -> bool:
        self._closing_each_response = True
        return True

    async def start(self) -> None:
        if not self.config.loaded:
            self.config.load()
        if self._closing_each_response and not isinstance(self.config.loaded_app, _ClosingEachResponse):
            self.config.loaded_app = _ClosingEachResponse(self.config.loaded_app)
        self.server.lifespan = self.config.lifespan_class(self.config)
        await self.server.startup()
        if self.ssl_context is None:
            self.ssl_context = self.config.ssl
        self._ticker = asyncio.get_running_loop().create_task(self.server.main_loop())

    async def add_connection(self, sock: socket.socket) -> None:
        if self.server.should_exit or not self.server.started:
            sock.close()
            return
        loop = asyncio.get_running_loop()
        await loop.connect_accepted_socket(self.server.create_protocol, sock, ssl=self.ssl_context)

    async def stop(self) -> None:
        if not self.server.started:
            return
        self.server.should_exit = True
        if self._ticker is not None:
            await self._ticker
        self.config.timeout_graceful_shutdown = shutdown_budget(self.shutdown_timeout)  # type: ignore[assignment]
        await self.server.shutdown()
