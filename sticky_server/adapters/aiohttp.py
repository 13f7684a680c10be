"""Serve an aiohttp ``web.Application``: ``sticky.work(AiohttpWorker(app))``.

The worker runs in asyncio mode: ``start`` sets up an ``AppRunner`` (running the
application's ``on_startup`` hooks) on the worker's loop, and each connection is
served with ``loop.connect_accepted_socket(runner.server, sock)``: from then on
aiohttp owns the socket. TLS: pass ``ssl_context``.

``stop`` runs ``AppRunner.cleanup``: idle keep-alive connections close, the
``on_shutdown`` hooks run (close your websockets there), requests in flight get up
to ``shutdown_timeout`` seconds (default: the time the master still allows), then
the ``on_cleanup`` hooks run.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from typing import Any

from ._extras import missing_extra

try:
    from aiohttp import web
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "aiohttp") from exc

from ..worker.base import AsyncWorker
from ._stopping import shutdown_budget

__all__ = ["AiohttpWorker"]


async def _close_after(request: web.Request, response: web.StreamResponse) -> None:
    """Each response says ``Connection: close`` and ends its connection (``close_each_response``)."""
    if not isinstance(response, web.WebSocketResponse):  # (it says "Connection: upgrade" and holds on)
        response.force_close()


class AiohttpWorker(AsyncWorker):
    """A worker that serves ``app`` (an aiohttp ``web.Application``) on the worker's event loop."""

    def __init__(
        self,
        app: web.Application,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        **runner_options: Any,
    ) -> None:
        self.app = app
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        self._runner_options = runner_options
        self.runner: web.AppRunner | None = None

    def close_each_response(self) -> bool:
        self.app.on_response_prepare.append(_close_after)
        return True

    async def start(self) -> None:
        # Before a stop, the budget is the whole graceful timeout less the margin (see shutdown_budget).
        options = {"shutdown_timeout": shutdown_budget(self.shutdown_timeout), **self._runner_options}
        self.runner = web.AppRunner(self.app, **options)
        await self.runner.setup()

    async def add_connection(self, sock: socket.socket) -> None:
        server = None if self.runner is None else self.runner.server
        if server is None:  # cleaned up: the worker is stopping
            sock.close()
            return
        await asyncio.get_running_loop().connect_accepted_socket(server, sock, ssl=self.ssl_context)

    async def stop(self) -> None:
        if self.runner is None:
            return
        await self.runner.cleanup()
