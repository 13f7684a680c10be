"""A python-socketio client manager that shares emits across workers over the sticky channel.

With it, ``await sio.emit(...)`` to a room or to everyone reaches the clients of every
worker on this machine, with no Redis. Install the extra: ``pip install
'sticky-server[socketio]'``. For many machines, use python-socketio's own Redis
manager instead (and put HAProxy or nginx with source hashing in front).

    sticky = StickyServer(workers=4)
    ...
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=StickyManager(sticky))

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
from collections.abc import AsyncIterator
from typing import Any

from socketio.async_pubsub_manager import AsyncPubSubManager

from ..server import StickyServer, current_server

__all__ = ["StickyManager"]


class StickyManager(AsyncPubSubManager):  # type: ignore[misc]
    """``socketio.AsyncPubSubManager`` over the master/worker channel of ``sticky`` (default: this process's)."""

    name = "sticky_server"

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
                "write StickyManager() with no argument to use that one (sticky_server.current_server())"
            )
        if sticky is not None and sticky.is_master:
            raise ValueError("StickyManager belongs in the workers (the branch that calls sticky.work())")
        super().__init__(channel=channel, write_only=write_only, logger=logger)
        self.sticky = sticky or current_server()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue[Any] | None = None
        if not self.sticky.is_master:  # (the command's master imports the app, and never serves it)
            self.sticky.on_message(self._on_channel_message)

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
        self.sticky.publish({"socketio": self.channel, "data": data}, include_self=True)

    async def _listen(self) -> AsyncIterator[Any]:
        assert self._queue is not None
        while True:
            yield await self._queue.get()
