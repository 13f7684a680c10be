"""The master's side of messages: to one worker or all, a worker's SEND to the master's handlers, PUBLISH relayed.

The envelopes and the codec are ``protocol.messages``'. A message for a worker is
queued on its link's outbox; the traffic part writes it at the end of the loop's
pass (``queued``). A slow worker's queue drops its oldest messages past
``MAX_QUEUED_MESSAGE_BYTES`` (logged, throttled) rather than block anyone.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from ..protocol.frames import Frame, FrameKind, encode_joined
from ..protocol.messages import (
    DEFAULT_MAX_MESSAGE_SIZE,
    DROP_LOG_INTERVAL,
    MAX_QUEUED_MESSAGE_BYTES,
    decode,
    sender_prefix,
    unpack_publish,
)
from ..util.throttle import ThrottledLog
from .link import Link
from .router import Router

__all__ = ["MessageRouter"]

logger = logging.getLogger("sticky_server.channel")

# Looked up once: on Python 3.11 each FrameKind.NAME runs a Python-level descriptor.
_MESSAGE = FrameKind.MESSAGE


class MessageRouter:
    """The master's side: messages to one worker, to all, from workers to the master's handlers, and relays.

    The router says which link is each slot's current one; ``queued`` is told of
    each link a frame was queued on (it is written at the end of the loop's pass).
    Call on the loop's thread.
    """

    def __init__(
        self,
        router: Router,
        queued: Callable[[Link], None],
        on_message: Callable[[int, Any], None],
        max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE,
        dropped: dict[int, int] | None = None,
    ) -> None:
        self._router = router
        self._queued = queued
        self._on_message = on_message
        self._max_message_size = max_message_size
        # Per slot: messages for it that never reached a worker (none at that moment, the oldest of a backlog,
        # or queued for one that died); the stats' table (``SlotCounters.messages_dropped``) when given.
        self.dropped: dict[int, int] = {} if dropped is None else dropped
        self._dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) queued for slow workers (latest: worker %d, over %d bytes waiting)",
            DROP_LOG_INTERVAL,
        )

    def send(self, slot: int, body: bytes, sender: int | None = None) -> bool:
        """Queue an encoded message for the current worker of ``slot``; False if the slot has none now."""
        return self._queue(slot, encode_joined(_MESSAGE, sender_prefix(sender), body))

    def broadcast(self, body: bytes, sender: int | None = None, skip: int | None = None) -> None:
        """Queue an encoded message for the current worker of every slot but ``skip``."""
        frame = encode_joined(_MESSAGE, sender_prefix(sender), body)  # built once for every receiver
        for slot in list(self._router.current):
            if slot != skip:
                self._queue(slot, frame)

    def on_send(self, link: Link, frame: Frame) -> None:
        """A worker's SEND: to the master's handlers."""
        self._check_size(len(frame.payload))
        self._on_message(link.worker.slot, decode(frame.payload))

    def on_publish(self, link: Link, frame: Frame) -> None:
        """A worker's PUBLISH: checked, then relayed unchanged to the others (and the sender if it asked)."""
        self._check_size(len(frame.payload) - 1)
        include_sender, body = unpack_publish(frame.payload)
        slot = link.worker.slot
        self.broadcast(body, sender=slot, skip=None if include_sender else slot)

    def _queue(self, slot: int, frame: bytes) -> bool:
        link = self._router.current_link(slot)
        if link is None or not link.connected:
            self.dropped[slot] = self.dropped.get(slot, 0) + 1
            return False
        dropped = link.outbox.put_message_frame(frame, MAX_QUEUED_MESSAGE_BYTES)
        if dropped:
            self.dropped[slot] = self.dropped.get(slot, 0) + dropped
            self._dropped_log.note(dropped, slot, MAX_QUEUED_MESSAGE_BYTES)
        self._queued(link)
        return True

    def lost(self, slot: int, count: int) -> None:
        """``count`` messages queued for ``slot``'s worker went with it: counted as dropped."""
        if count:
            self.dropped[slot] = self.dropped.get(slot, 0) + count

    def _check_size(self, body_size: int) -> None:
        if body_size > self._max_message_size:
            raise ProtocolError(f"a message of {body_size} bytes (max_message_size is {self._max_message_size})")
