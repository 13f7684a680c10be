"""Serve with plain asyncio: a protocol factory, or a streams callback as for ``asyncio.start_server``.

    sticky.work(AsyncioWorker(client_connected=handle))       # async def handle(reader, writer)
    sticky.work(AsyncioWorker(protocol_factory=MyProtocol))

Each connection is served with ``loop.connect_accepted_socket`` on the worker's
event loop (the worker runs in asyncio mode). TLS: pass ``ssl_context``.

Stop: no new connection is taken, ``stopping`` (an ``asyncio.Event``) is set so
your handlers can end idle connections, and ``stop()`` waits for the open
connections to close, for at most ``shutdown_timeout`` seconds (default: the
time the master still allows); the rest are then closed.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import weakref
from collections.abc import Awaitable, Callable

from ..worker.base import AsyncWorker
from ._stopping import shutdown_budget

__all__ = ["AsyncioWorker"]

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None] | None]

# How often stop() looks whether the connections have closed.
_POLL_SECONDS = 0.05


class AsyncioWorker(AsyncWorker):
    """Serve each connection with ``protocol_factory`` or the streams callback ``client_connected``."""

    def __init__(
        self,
        protocol_factory: Callable[[], asyncio.BaseProtocol] | None = None,
        *,
        client_connected: StreamHandler | None = None,
        ssl_context: ssl.SSLContext | None = None,
        shutdown_timeout: float | None = None,
        stream_limit: int = 2**16,
    ) -> None:
        if (protocol_factory is None) == (client_connected is None):
            raise TypeError("AsyncioWorker needs exactly one of protocol_factory=... or client_connected=...")
        if protocol_factory is None:
            assert client_connected is not None
            callback = client_connected

            def streams() -> asyncio.BaseProtocol:
                return asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=stream_limit), callback)

            protocol_factory = streams
        self.protocol_factory = protocol_factory
        self.ssl_context = ssl_context
        self.shutdown_timeout = shutdown_timeout
        # Weak: a transport the loop has let go of drops out with no per-connection pruning.
        self._transports: weakref.WeakSet[asyncio.BaseTransport] = weakref.WeakSet()
        self._stopping: asyncio.Event | None = None

    @property
    def stopping(self) -> asyncio.Event:
        """Set when the worker is told to stop: end idle connections when you see it."""
        if self._stopping is None:
            self._stopping = asyncio.Event()
        return self._stopping

    async def add_connection(self, sock: socket.socket) -> None:
        if self.stopping.is_set():
            sock.close()
            return
        loop = asyncio.get_running_loop()
        transport, _ = await loop.connect_accepted_socket(self.protocol_factory, sock, ssl=self.ssl_context)
        self._transports.add(transport)

    async def stop(self) -> None:
        self.stopping.set()
        deadline = asyncio.get_running_loop().time() + shutdown_budget(self.shutdown_timeout)
        while any(not transport.is_closing() for transport in self._transports):
            if asyncio.get_running_loop().time() >= deadline:
                break
            await asyncio.sleep(_POLL_SECONDS)
        for transport in list(self._transports):
            transport.close()
        await asyncio.sleep(0)  # let the closes run their connection_lost callbacks
