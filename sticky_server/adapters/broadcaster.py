"""A backend for the ``broadcaster`` package's ``Broadcast`` over the master's channel: no Redis.

    from broadcaster import Broadcast
    from sticky_server.adapters.broadcaster import StickyBackend

    broadcast = Broadcast(backend=StickyBackend())

Install the extra: ``pip install 'sticky-server[broadcaster]'``. ``publish`` on any
worker reaches the subscribers of that channel on every worker (its own included),
as broadcaster's Redis backend does across processes; it is built on
``sticky_server.pubsub`` and has its bounds: messages are JSON (broadcaster's
examples send str), at most ``max_message_size`` bytes, and a worker whose
listener falls more than ``max_queued`` events behind drops the oldest
(``dropped`` counts them). For many machines, use broadcaster's Redis backend.
Outside a sticky-server it is one process's, as ``memory://`` is.
"""

from __future__ import annotations

import asyncio
import collections
from collections.abc import Callable
from typing import Any

from ._extras import missing_extra

try:
    from broadcaster import BroadcastBackend, Event
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "broadcaster") from exc

from .. import pubsub
from ..util.futures import wake

__all__ = ["StickyBackend"]

DEFAULT_MAX_QUEUED = 10_000


class StickyBackend(BroadcastBackend):
    """broadcaster's backend API (connect, subscribe, publish, next_published) over ``sticky_server.pubsub``."""

    def __init__(self, url: str = "sticky://", *, prefix: str = "broadcaster", max_queued: int = DEFAULT_MAX_QUEUED):
        self.prefix = prefix
        self.max_queued = max_queued
        self.dropped = 0
        self._stops: dict[str, Callable[[], None]] = {}
        self._events: collections.deque[Event] = collections.deque()
        self._waiter: asyncio.Future[None] | None = None

    async def connect(self) -> None:
        self._events.clear()

    async def disconnect(self) -> None:
        for stop in self._stops.values():
            stop()
        self._stops.clear()

    async def subscribe(self, channel: str) -> None:
        if channel not in self._stops:
            self._stops[channel] = pubsub.listen(
                f"{self.prefix}.{channel}", lambda message: self._arrived(channel, message)
            )

    async def unsubscribe(self, channel: str) -> None:
        stop = self._stops.pop(channel, None)
        if stop is not None:
            stop()

    async def publish(self, channel: str, message: Any) -> None:
        pubsub.publish(f"{self.prefix}.{channel}", message)

    async def next_published(self) -> Event:
        while not self._events:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._events.popleft()

    def _arrived(self, channel: str, message: Any) -> None:
        # On the thread the worker handles messages on (its event loop's, for an asynchronous worker).
        if len(self._events) >= self.max_queued:
            self._events.popleft()
            self.dropped += 1
        self._events.append(Event(channel=channel, message=message))
        waiter = self._waiter
        if waiter is not None:
            wake(waiter)
