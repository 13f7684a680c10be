"""Publish and subscribe across the workers of one machine, over the master's channel: no broker.

    from sticky_server import pubsub

    pubsub.publish("room:42", {"text": "hi"})           # any worker (or the master), any thread

    async with pubsub.subscribe("room:42") as messages:  # in a worker: every worker's publishes
        async for message in messages:
            ...

    with pubsub.subscribe("room:42") as messages:        # from a thread (a WSGI view, say)
        message = messages.get_blocking(timeout=5)

A published message goes to every subscriber of its topic on every worker, the
publisher's own included, in the order each publisher published (the master relays
it to every worker; each worker hands it to its subscribers of that topic). Messages
are JSON values, as everything on the channel: a value that is not JSON raises
``TypeError`` in ``publish``, one over ``max_message_size`` ``ValueError``.

Bounds: each subscription queues at most ``max_queued`` messages (default 1000); past
that its oldest is dropped and counted (``Subscription.dropped``, logged at most every
10 s), so a subscriber that never reads costs bounded memory and slows nobody. Below
that, the channel's own bounds apply (a worker more than 16 MiB behind loses its
oldest messages; a message to a slot with no worker at that moment, one restarting,
is dropped).

Subscriptions live in their process: a worker that restarts starts with none, and
what was published while it was away is not replayed. ``close()`` (or leaving the
``with`` block) ends a subscription; iterating a closed one stops.

Outside a sticky-server (a test, a shell, a script) messages stay in the process:
``publish`` delivers to the subscribers of this process only.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import weakref
from collections.abc import Callable
from types import TracebackType
from typing import Any

from .errors import StickyServerError
from .protocol import messages as channel_codec
from .server import StickyServer
from .util.futures import wake
from .util.throttle import ThrottledLog

__all__ = [
    "DEFAULT_MAX_QUEUED",
    "MAX_TOPIC_LENGTH",
    "Subscription",
    "SubscriptionClosed",
    "checked_copy",
    "listen",
    "publish",
    "subscribe",
]

logger = logging.getLogger("sticky_server.pubsub")

DEFAULT_MAX_QUEUED = 1000
MAX_TOPIC_LENGTH = 256
# How often at most the dropped messages of slow subscribers are logged.
DROP_LOG_INTERVAL = 10.0

Listener = Callable[[Any], None]


class SubscriptionClosed(StickyServerError):
    """``get`` on a subscription that was closed."""


def _check_topic(topic: object) -> str:
    if not isinstance(topic, str) or not 0 < len(topic) <= MAX_TOPIC_LENGTH:
        raise ValueError(f"a topic is a non-empty str of at most {MAX_TOPIC_LENGTH} characters, got {topic!r}")
    return topic


class _Hub:
    """A process's subscribers by topic, fed from its channel (or, outside a server, by ``publish`` itself)."""

    def __init__(self, sticky: StickyServer | None) -> None:
        self.sticky = sticky
        self._listeners: dict[str, tuple[Listener, ...]] = {}
        self._lock = threading.Lock()
        self.dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) of subscribers that read too slowly (latest on topic %r)",
            DROP_LOG_INTERVAL,
        )
        if sticky is not None and not sticky.is_master:
            sticky.on_message(self._on_message)

    def add(self, topic: str, listener: Listener) -> None:
        with self._lock:
            self._listeners[topic] = (*self._listeners.get(topic, ()), listener)

    def remove(self, topic: str, listener: Listener) -> None:
        with self._lock:
            left = tuple(each for each in self._listeners.get(topic, ()) if each is not listener)
            if left:
                self._listeners[topic] = left
            else:
                self._listeners.pop(topic, None)

    def publish(self, topic: str, message: Any) -> None:
        envelope = {"pubsub": topic, "data": message}
        sticky = self.sticky
        if sticky is None:
            # Checked and copied as the channel would: what a subscriber gets is never the publisher's object.
            self.deliver(topic, checked_copy(envelope)["data"])
        elif sticky.is_master:
            sticky.broadcast(envelope)
        else:
            sticky.publish(envelope, include_self=True)

    def deliver(self, topic: str, message: Any) -> None:
        for listener in self._listeners.get(topic, ()):
            try:
                listener(message)
            except Exception:
                logger.exception("a listener of topic %r raised", topic)

    def _on_message(self, sender: int | None, message: Any) -> None:
        if type(message) is dict:
            topic = message.get("pubsub")
            if type(topic) is str and "data" in message:
                self.deliver(topic, message["data"])


_hubs: weakref.WeakKeyDictionary[StickyServer, _Hub] = weakref.WeakKeyDictionary()
_local_hub: _Hub | None = None
_hubs_lock = threading.Lock()


def _hub() -> _Hub:
    """This process's hub: its StickyServer's, or (outside a server) one of its own."""
    global _local_hub
    sticky = StickyServer._current
    with _hubs_lock:
        if sticky is None:
            if _local_hub is None:
                logger.info("pubsub outside a sticky-server: messages stay in this process")
                _local_hub = _Hub(None)
            return _local_hub
        hub = _hubs.get(sticky)
        if hub is None:
            hub = _hubs[sticky] = _Hub(sticky)
        return hub


def checked_copy(message: Any) -> Any:
    """``message`` as it would arrive over the channel: a copy, or TypeError / ValueError as ``publish`` raises."""
    sticky = StickyServer._current
    limit = channel_codec.DEFAULT_MAX_MESSAGE_SIZE if sticky is None else sticky.settings.max_message_size
    return channel_codec.decode(channel_codec.encode(message, limit))


def publish(topic: str, message: Any) -> None:
    """Send the JSON ``message`` to every subscriber of ``topic`` on every worker (this one's included).

    Never blocks; from any thread, in a worker or in the master (after ``listen``).
    TypeError if it is not JSON, ValueError if it is over ``max_message_size``.
    """
    _hub().publish(_check_topic(topic), message)


def listen(topic: str, listener: Listener) -> Callable[[], None]:
    """Call ``listener(message)`` for each message on ``topic`` (in a worker: on the thread that called
    ``work()``, the event loop's for an asynchronous worker; keep it short). Returns the call that stops it.

    For libraries that keep their own queues (the Channels layer, the broadcaster backend);
    ``subscribe`` is the bounded queue most code wants.
    """
    hub = _hub()
    hub.add(_check_topic(topic), listener)
    return lambda: hub.remove(topic, listener)


def subscribe(topic: str, max_queued: int = DEFAULT_MAX_QUEUED) -> Subscription:
    """A new ``Subscription`` to ``topic``: async iterator, context manager, and blocking ``get_blocking``."""
    if isinstance(max_queued, bool) or not isinstance(max_queued, int) or max_queued < 1:
        raise ValueError(f"max_queued must be a positive int, got {max_queued!r}")
    return Subscription(_hub(), _check_topic(topic), max_queued)


class Subscription:
    """The messages published on one topic since it was made, at most ``max_queued`` of them (the oldest go).

    Read it from coroutines on any event loop (``async for``, ``await get()``) or from
    threads (``get_blocking``, ``for``); ``dropped`` counts what was dropped.
    """

    def __init__(self, hub: _Hub, topic: str, max_queued: int) -> None:
        self.topic = topic
        self.max_queued = max_queued
        self.dropped = 0
        self.closed = False
        self._hub = hub
        self._queue: collections.deque[Any] = collections.deque()
        self._lock = threading.Lock()
        self._ready = threading.Condition(self._lock)
        self._waiters: list[asyncio.Future[None]] = []
        hub.add(topic, self._deliver)

    def _deliver(self, message: Any) -> None:
        with self._lock:
            if self.closed:
                return
            dropped = len(self._queue) >= self.max_queued
            if dropped:
                self._queue.popleft()
                self.dropped += 1
            self._queue.append(message)
            self._ready.notify()
            waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            wake(waiter)
        if dropped:
            self._hub.dropped_log.note(1, self.topic)

    async def get(self) -> Any:
        """The next message; waits for one. SubscriptionClosed once closed and read to the end."""
        while True:
            with self._lock:
                if self._queue:
                    return self._queue.popleft()
                if self.closed:
                    raise SubscriptionClosed(f"the subscription to {self.topic!r} is closed")
                waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                self._waiters.append(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    if waiter in self._waiters:
                        self._waiters.remove(waiter)

    def get_blocking(self, timeout: float | None = None) -> Any:
        """The next message, waiting at most ``timeout`` seconds (TimeoutError), from a thread."""
        with self._ready:
            if not self._ready.wait_for(lambda: self._queue or self.closed, timeout):
                raise TimeoutError(f"no message on {self.topic!r} within {timeout} s")
            if self._queue:
                return self._queue.popleft()
            raise SubscriptionClosed(f"the subscription to {self.topic!r} is closed")

    def close(self) -> None:
        """No more messages; readers waiting get what is queued, then the end."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            self._ready.notify_all()
            waiters, self._waiters = self._waiters, []
        self._hub.remove(self.topic, self._deliver)
        for waiter in waiters:
            wake(waiter)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Any:
        try:
            return await self.get()
        except SubscriptionClosed:
            raise StopAsyncIteration from None

    def __iter__(self) -> Subscription:
        return self

    def __next__(self) -> Any:
        try:
            return self.get_blocking()
        except SubscriptionClosed:
            raise StopIteration from None

    def __enter__(self) -> Subscription:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()
