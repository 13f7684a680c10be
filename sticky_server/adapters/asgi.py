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

import uvicorn

from ..async_worker import AsyncWorker
from ._stopping import shutdown_budget

__all__ = ["ASGIWorker"]


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


class ASGIWorker(AsyncWorker):
    """A worker that serves the ASGI application ``app`` with uvicorn's protocols."""

    def __init__(
        self,
        app: Any,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        **config: Any,
    ) -> None:
        self.config = uvicorn.Config(app, **config)
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self.server = _HandedOffServer(self.config)
        self._ticker: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if not self.config.loaded:
            self.config.load()
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
