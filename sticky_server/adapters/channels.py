"""A Django Channels layer over the master's channel: groups and channels across the workers, no Redis.

    CHANNEL_LAYERS = {"default": {"BACKEND": "sticky_server.adapters.channels.StickyChannelLayer"}}

Install the extra: ``pip install 'sticky-server[channels]'``. Options, as channels
defines them: ``expiry`` (seconds a message waits to be received, default 60),
``group_expiry`` (seconds a group membership lasts, default 86400), ``capacity``
(messages a channel holds, default 100) and ``channel_capacity`` (per channel-name
pattern); ``prefix`` keeps two layers of one server apart.

How it works. Each worker holds the channels its consumers receive on
(``new_channel`` names carry the worker's slot and process: ``specific.sticky2-
k3j9x0qa!Hd8...``) and the memberships of those channels. ``group_send`` is one
message over the channel, relayed by the master to every worker, and each worker
puts it on its own members' channels (the sender's own members have it before
``group_send`` returns, as with a broker); a ``send`` or ``group_add`` for another
worker's channel travels the same way and only its owner acts on it. So a group
spans the workers with no shared table, and a worker that restarts takes its
channels and memberships with it (their consumers' connections went with it too).

As channels defines them, and as channels-redis does: ``ChannelFull`` when a
channel of this worker is full; message expiry (a message not received within
``expiry`` is dropped; its channel stays in its groups); group expiry; ``flush``
(every worker's channels and groups). Unlike a broker:
a channel of another worker that is full or gone drops the message there and
counts it (``dropped``, logged at most every 10 s), since the sender cannot wait
for the answer; a normal channel name (no ``!``) is this worker's own queue, so
``send`` and ``receive`` on one meet only within a worker (Channels' background
``runworker`` needs a broker: channels-redis).

Messages are what channels-redis carries, as JSON on the channel: dicts of str keys
with str, int, float, bool, None, list, dict and bytes values (tuples arrive as
lists); anything else raises ``TypeError``, a message over the server's
``max_message_size`` ``ValueError``.

Outside a sticky-server worker (``manage.py test``, ``manage.py shell``) it is what
channels' ``InMemoryChannelLayer`` is, one process's channels and groups, and logs so
once at INFO.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import logging
import secrets
import string
import threading
import time
from typing import Any, ClassVar

from ._extras import missing_extra

try:
    from channels.exceptions import ChannelFull
    from channels.layers import BaseChannelLayer
except ModuleNotFoundError as exc:
    raise missing_extra(exc, "channels") from exc

from .. import pubsub
from ..server import StickyServer
from ..util.futures import wake
from ..util.throttle import ThrottledLog

__all__ = ["StickyChannelLayer"]

logger = logging.getLogger("sticky_server.channels")

# How often at most the messages dropped for full or gone channels of this worker are logged.
DROP_LOG_INTERVAL = 10.0
_BYTES = "\x00bytes"  # a bytes value, base64 in JSON: {"\x00bytes": "..."} (no key a message of channels uses)
_ALPHABET = string.ascii_lowercase + string.digits
# Expired messages of channels nobody receives on, and expired memberships, are swept at most this often.
SWEEP_INTERVAL = 1.0


def _to_json(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {_BYTES: base64.b64encode(value).decode("ascii")}
    if isinstance(value, dict):
        return {key: _to_json(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_to_json(item) for item in value]
    return value


def _from_json(value: Any) -> Any:
    if isinstance(value, dict):
        if len(value) == 1 and _BYTES in value:
            return base64.b64decode(value[_BYTES])
        return {key: _from_json(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_from_json(item) for item in value]
    return value


class _Channel:
    """One channel's queue of (expires at, sent at, message) and the coroutines waiting on it."""

    __slots__ = ("messages", "waiters")

    def __init__(self) -> None:
        self.messages: collections.deque[tuple[float, float, dict[str, Any]]] = collections.deque()  # expires, sent
        self.waiters: list[asyncio.Future[None]] = []


class StickyChannelLayer(BaseChannelLayer):  # type: ignore[misc]
    """Django Channels' layer API (``send``, ``receive``, ``new_channel``, groups, ``flush``) across the workers."""

    extensions: ClassVar[list[str]] = ["groups", "flush"]

    def __init__(
        self,
        expiry: float = 60,
        group_expiry: float = 86400,
        capacity: int = 100,
        channel_capacity: dict[Any, int] | None = None,
        prefix: str = "asgi",
        **kwargs: Any,
    ) -> None:
        super().__init__(expiry=expiry, capacity=capacity, channel_capacity=channel_capacity, **kwargs)
        self.channel_capacity = self.compile_capacities(channel_capacity or {})
        self.group_expiry = group_expiry
        self.prefix = prefix
        self.dropped = 0  # messages for this worker's channels that were full or gone
        sticky = StickyServer._current
        if sticky is None or sticky.is_master:
            self.slot: int | None = None
            if sticky is None:
                logger.info("StickyChannelLayer outside a sticky-server worker: one process's channels and groups")
        else:
            self.slot = sticky.worker_id
        # This process's channels are named after it: a channel of the worker this one replaced is not its own.
        self.process = f"sticky{self.slot if self.slot is not None else 'local'}-{_token(8)}"
        self._channels: dict[str, _Channel] = {}
        self._groups: dict[str, dict[str, float]] = {}  # group -> this worker's member channels -> joined at
        self._lock = threading.Lock()
        self._next_sweep = 0.0
        self._dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d message(s) for channels of this worker that were full or gone (latest for %s)",
            DROP_LOG_INTERVAL,
        )
        self._topic = f"channels.{prefix}"
        self._stop_listening = pubsub.listen(self._topic, self._on_envelope)

    # --- names -------------------------------------------------------------------------

    async def new_channel(self, prefix: str = "specific.") -> str:
        """A new channel of this worker's (its consumers receive on it)."""
        return f"{prefix}{self.process}!{_token(12)}"

    def _is_mine(self, channel: str) -> bool:
        if "!" not in channel:
            return True  # a normal channel: this worker's own queue (see the module docstring)
        return channel[: channel.index("!")].endswith(self.process)

    # --- channels ----------------------------------------------------------------------

    async def send(self, channel: str, message: dict[str, Any]) -> None:
        """Put ``message`` on ``channel``: here at once (ChannelFull when full), or on its worker."""
        assert isinstance(message, dict), "message is not a dict"
        self.require_valid_channel_name(channel)
        assert "__asgi_channel__" not in message
        if self._is_mine(channel):
            copy = _from_json(pubsub.checked_copy(_to_json(message)))
            if not self._put(channel, time.time() + self.expiry, copy):
                raise ChannelFull(channel)
            return
        pubsub.publish(self._topic, {"send": channel, "at": time.time() + self.expiry, "message": _to_json(message)})

    @property
    def client_prefix(self) -> str:
        """What names this process's channels (channels-redis's name for it)."""
        return self.process

    async def receive(self, channel: str) -> dict[str, Any]:
        """The first message that arrives on ``channel`` (one of this worker's), waiting for one."""
        self.require_valid_channel_name(channel)
        assert self._is_mine(channel), f"{channel} is another process's channel: receive on those of new_channel()"
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                self._sweep_now_and_then()
                queue = self._channels.get(channel)
                if queue is not None:
                    now = time.time()
                    while queue.messages and queue.messages[0][0] < now:
                        queue.messages.popleft()  # expired
                if queue is not None and queue.messages:
                    message = queue.messages.popleft()[2]
                    if not queue.messages and not queue.waiters:
                        del self._channels[channel]
                    return message
                if queue is None:
                    queue = self._channels[channel] = _Channel()
                waiter: asyncio.Future[None] = loop.create_future()
                queue.waiters.append(waiter)
            try:
                await waiter
            finally:
                with self._lock:
                    if waiter in queue.waiters:
                        queue.waiters.remove(waiter)
                    if not queue.messages and not queue.waiters and self._channels.get(channel) is queue:
                        del self._channels[channel]

    def _put(self, channel: str, expires: float, message: dict[str, Any]) -> bool:
        """Queue ``message`` on this worker's ``channel``; False when it is full (or the message expired)."""
        if expires < time.time():
            return False
        with self._lock:
            queue = self._channels.get(channel)
            if queue is None:
                queue = self._channels[channel] = _Channel()
            if len(queue.messages) >= self.get_capacity(channel):
                return False
            queue.messages.append((expires, expires - self.expiry, message))
            waiters, queue.waiters = queue.waiters, []
        for waiter in waiters:
            wake(waiter)
        return True

    def _sweep_now_and_then(self) -> None:
        """``_clean_expired`` at most every ``SWEEP_INTERVAL``: each receive and delivery looks at its own part."""
        now = time.monotonic()
        if now >= self._next_sweep:
            self._next_sweep = now + SWEEP_INTERVAL
            self._clean_expired()

    def _clean_expired(self) -> None:
        """Drop expired messages and expired memberships; under the lock."""
        now = time.time()
        for channel, queue in list(self._channels.items()):
            while queue.messages and queue.messages[0][0] < now:
                queue.messages.popleft()
            if not queue.messages and not queue.waiters:
                del self._channels[channel]
        joined_since = now - self.group_expiry
        for group, members in list(self._groups.items()):
            for channel, joined in list(members.items()):
                if joined < joined_since:
                    del members[channel]
            if not members:
                del self._groups[group]

    # --- groups ------------------------------------------------------------------------

    async def group_add(self, group: str, channel: str) -> None:
        """Add ``channel`` to ``group`` (held by the channel's worker)."""
        self.require_valid_group_name(group)
        self.require_valid_channel_name(channel)
        if self._is_mine(channel):
            self._join(group, channel)
        else:
            pubsub.publish(self._topic, {"add": group, "channel": channel})

    async def group_discard(self, group: str, channel: str) -> None:
        """Take ``channel`` out of ``group``."""
        self.require_valid_channel_name(channel)
        self.require_valid_group_name(group)
        if self._is_mine(channel):
            self._leave(group, channel)
        else:
            pubsub.publish(self._topic, {"discard": group, "channel": channel})

    async def group_send(self, group: str, message: dict[str, Any]) -> None:
        """Send ``message`` to every channel of ``group`` on every worker (a full channel misses it).

        This layer's own members have it when this returns, as with a broker; the other
        workers' as soon as the master relays it.
        """
        assert isinstance(message, dict), "Message is not a dict"
        self.require_valid_group_name(group)
        payload, expires = _to_json(message), time.time() + self.expiry
        self._deliver_to_group(group, expires, pubsub.checked_copy(payload))
        pubsub.publish(self._topic, {"group": group, "at": expires, "message": payload, "from": self.process})

    def _join(self, group: str, channel: str) -> None:
        with self._lock:
            self._groups.setdefault(group, {})[channel] = time.time()

    def _leave(self, group: str, channel: str) -> None:
        with self._lock:
            members = self._groups.get(group)
            if members is not None:
                members.pop(channel, None)
                if not members:
                    del self._groups[group]

    # --- flush, close ------------------------------------------------------------------

    async def flush(self) -> None:
        """Empty every channel and group, on every worker (this one at once): all that was there when it was called."""
        now = time.time()
        self._flush_here(now)
        pubsub.publish(self._topic, {"flush": self.process, "at": now})

    def _flush_here(self, before: float) -> None:
        """Drop the messages sent and the memberships made before ``before`` (a flush arrives after its time)."""
        with self._lock:
            for queue in self._channels.values():
                queue.messages = collections.deque(entry for entry in queue.messages if entry[1] >= before)
            for group, members in list(self._groups.items()):
                self._groups[group] = {channel: joined for channel, joined in members.items() if joined >= before}
                if not self._groups[group]:
                    del self._groups[group]

    async def close(self) -> None:
        self._stop_listening()

    # --- what comes over the channel ------------------------------------------------------

    def _on_envelope(self, envelope: Any) -> None:
        if not isinstance(envelope, dict):
            return
        if "group" in envelope:
            if envelope.get("from") != self.process:  # (its sender's own members had it at once)
                self._deliver_to_group(envelope["group"], envelope["at"], envelope["message"])
        elif "send" in envelope:
            channel = envelope["send"]
            if self._is_mine(channel) and "!" in channel:
                self._deliver(channel, envelope["at"], _from_json(envelope["message"]))
        elif "add" in envelope:
            if "!" in envelope["channel"] and self._is_mine(envelope["channel"]):
                self._join(envelope["add"], envelope["channel"])
        elif "discard" in envelope:
            if "!" in envelope["channel"] and self._is_mine(envelope["channel"]):
                self._leave(envelope["discard"], envelope["channel"])
        elif "flush" in envelope and envelope["flush"] != self.process:
            self._flush_here(envelope["at"])

    def _deliver_to_group(self, group: str, expires: float, message: Any) -> None:
        with self._lock:
            self._sweep_now_and_then()
            joined_since = time.time() - self.group_expiry
            members = [channel for channel, joined in self._groups.get(group, {}).items() if joined >= joined_since]
        if not members:
            return
        decoded = _from_json(message)
        full = 0
        for channel in members:
            # (each its own dict: a consumer may change its own)
            if not self._put(channel, expires, dict(decoded)):
                full += 1
        if full:
            self.dropped += full
            logger.info("%s of %s channels over capacity in group %s", full, len(members), group)  # channels-redis's

    def _deliver(self, channel: str, expires: float, message: dict[str, Any]) -> None:
        if not self._put(channel, expires, message):
            self.dropped += 1
            self._dropped_log.note(1, channel)


def _token(length: int) -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(length))
