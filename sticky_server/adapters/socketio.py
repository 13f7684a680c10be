"""python-socketio client managers that share emits across workers over the sticky channel.

With one, ``sio.emit(...)`` to a room or to everyone reaches the clients of every
worker on this machine, with no Redis. Install the extra: ``pip install
'sticky-server[socketio]'``. For many machines, use python-socketio's own Redis
manager instead (and put HAProxy or nginx with source hashing in front).

    sio = socketio.AsyncServer(async_mode="asgi", client_manager=StickyManager())      # asyncio servers
    sio = socketio.Server(async_mode="threading", client_manager=SyncStickyManager())  # WSGI, Flask-SocketIO
    socketio = SocketIO(app, client_manager=SyncStickyManager())                       # Flask-SocketIO

Under the ``sticky-server`` command there is no ``StickyServer`` to pass: write
``StickyManager()`` and it uses the one the command made (``current_server()``).
In the master, which imports the app but never serves it, such a manager does
nothing.

It behaves like python-socketio's Redis manager: every message goes to every worker,
this one included; python-socketio itself skips what it already handled locally.
Messages must be JSON (they are: python-socketio base64-encodes binary data).
"""

from __future__ import annotations

import asyncio
import logging
import queue
from collections.abc import AsyncIterator, Iterator
from typing import Any

from ._extras import missing_extra

try:
    from socketio.async_pubsub_manager import AsyncPubSubManager
    from socketio.pubsub_manager import PubSubManager
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "socketio") from exc

from ..server import StickyServer, current_server

__all__ = ["StickyManager", "SyncStickyManager"]


class _OverTheChannel:
    """What both managers share: the server they use, and the server kind they serve."""

    name = "sticky_server"
    asyncio_based: bool  # which python-socketio server this manager is for

    def __init__(
        self,
        sticky: StickyServer | None = None,
        channel: str = "socketio",
        write_only: bool = False,
        logger: logging.Logger | None = None,
    ) -> None:
        if sticky is not None and sticky is not StickyServer._current:
            raise ValueError(
                "this StickyServer is not the one this process runs (the sticky-server command made its own): "
                "leave the argument out to use that one (sticky_server.current_server())"
            )
        if sticky is not None and sticky.is_master:
            raise ValueError("a sticky client manager belongs in the workers (the branch that calls sticky.work())")
        self.sticky = sticky or current_server()
        super().__init__(channel=channel, write_only=write_only, logger=logger)  # type: ignore[call-arg]
        if not self.sticky.is_master:  # (the command's master with --preload imports the app, and never serves it)
            self.sticky.on_message(self._on_channel_message)

    def set_server(self, server: Any) -> None:
        if server.is_asyncio_based() != self.asyncio_based:
            raise TypeError(
                "StickyManager is for socketio.AsyncServer; socketio.Server and Flask-SocketIO need SyncStickyManager"
                if self.asyncio_based
                else "SyncStickyManager is for socketio.Server and Flask-SocketIO; socketio.AsyncServer needs "
                "StickyManager"
            )
        super().set_server(server)  # type: ignore[misc]

    def _on_channel_message(self, sender: int | None, message: Any) -> None:
        raise NotImplementedError

    def _envelope(self, data: Any) -> dict[str, Any]:
        return {"socketio": self.channel, "data": data}  # type: ignore[attr-defined]


class StickyManager(_OverTheChannel, AsyncPubSubManager):  # type: ignore[misc]
    """``socketio.AsyncPubSubManager`` over the master/worker channel of ``sticky`` (default: this process's)."""

    asyncio_based = True
    _loop: asyncio.AbstractEventLoop | None = None
    _queue: asyncio.Queue[Any] | None = None

    def initialize(self) -> None:
        # python-socketio calls this on its event loop, before the first client.
        self._loop = asyncio.get_running_loop()
        self._queue = asyncio.Queue()
        super().initialize()

    def _on_channel_message(self, sender: int | None, message: Any) -> None:
        # Runs on the thread that called work(): hand it to the server's loop.
        if self._loop is None or self._queue is None:
            return  # no client can be on this worker yet
        if isinstance(message, dict) and message.get("socketio") == self.channel:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, message["data"])

    async def _publish(self, data: Any) -> None:
        self.sticky.publish(self._envelope(data), include_self=True)

    async def _listen(self) -> AsyncIterator[Any]:
        assert self._queue is not None
        while True:
            yield await self._queue.get()


class SyncStickyManager(_OverTheChannel, PubSubManager):  # type: ignore[misc]
    """``socketio.PubSubManager`` over the sticky channel, for ``socketio.Server`` and Flask-SocketIO.

    For the threading async mode (``adapters.wsgi.WSGIWorker``): messages from the
    channel are queued for python-socketio's listening thread.
    """

    asyncio_based = False

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()  # before messages can arrive
        super().__init__(*args, **kwargs)

    def _on_channel_message(self, sender: int | None, message: Any) -> None:
        if isinstance(message, dict) and message.get("socketio") == self.channel:
            self._queue.put(message["data"])

    def _publish(self, data: Any) -> None:
        self.sticky.publish(self._envelope(data), include_self=True)

    def _listen(self) -> Iterator[Any]:
        while True:
            yield self._queue.get()
