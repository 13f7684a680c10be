"""The worker's side of its control socket: every frame it sends goes through its ``WorkerChannel``."""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
from collections.abc import Callable
from typing import Any

from ..protocol.frames import MAX_FDS_PER_FRAME, FrameKind
from ..protocol.messages import DROP_LOG_INTERVAL, EARLY_FLUSH_BYTES, MAX_QUEUED_MESSAGE_BYTES, pack_publish
from ..protocol.outbox import Outbox
from ..util.throttle import ThrottledLog
from ..util.waker import Waker

__all__ = ["WorkerChannel"]

logger = logging.getLogger("sticky_server.channel")


class WorkerChannel:
    """The worker's side of its control socket: every write goes through here, from any thread.

    Writes are queued (control frames before messages, see ``Outbox``) and written
    by the worker loop; another thread that queues a message wakes the loop. So
    ``send``/``publish`` never block the caller and never interleave bytes.
    """

    def __init__(self, control: socket.socket) -> None:
        control.setblocking(False)
        self.control = control
        self.handlers: list[Callable[[int | None, Any], object]] = []
        self.closed = False
        self._outbox = Outbox()
        self._flush_early_at = EARLY_FLUSH_BYTES
        self._lock = threading.Lock()
        self.waker = Waker()  # other threads' messages wake the worker loop
        self._dropped_log = ThrottledLog(
            logger,
            logging.WARNING,
            "dropped %d oldest message(s) for the master: over %d bytes were waiting (is the master stuck?)",
            DROP_LOG_INTERVAL,
        )

    def send(self, body: bytes) -> None:
        """Queue an encoded message for the master's handlers."""
        self.put_message(FrameKind.SEND, body)

    def publish(self, body: bytes, include_self: bool) -> None:
        """Queue an encoded message for the master to relay to the other workers (and this one)."""
        self.put_message(FrameKind.PUBLISH, pack_publish(include_self, body))

    def put_control(self, kind: FrameKind, payload: bytes = b"") -> None:
        with self._lock:
            self._outbox.put(kind, payload)

    def put_moved(self, fds: list[int]) -> None:
        """Queue connections this worker accepted for the master to route elsewhere (route_by); the channel
        owns the descriptors now and closes its copies once they are sent."""
        with self._lock:
            for start in range(0, len(fds), MAX_FDS_PER_FRAME):
                self._outbox.put(FrameKind.MOVED, b"", fds[start : start + MAX_FDS_PER_FRAME])

    def put_message(self, kind: FrameKind, payload: bytes) -> None:
        """Queue a message frame for the master and wake the loop."""
        if self.closed:
            raise RuntimeError("this worker has stopped: it can no longer send messages")
        with self._lock:
            outbox = self._outbox
            dropped = outbox.put_message(kind, payload, MAX_QUEUED_MESSAGE_BYTES)
            if outbox.message_bytes >= self._flush_early_at:
                # A burst of sends (say, a loop publishing thousands of messages in one
                # handler) starts going out now rather than when the loop next turns, so
                # the master relays while this process is still producing.
                with contextlib.suppress(OSError):  # the loop sees a gone master
                    outbox.flush(self.control)
                self._flush_early_at = outbox.message_bytes + EARLY_FLUSH_BYTES
        if dropped:
            self._dropped_log.note(dropped, MAX_QUEUED_MESSAGE_BYTES)
        self.waker.wake()

    def pending(self) -> bool:
        """True while anything is queued for the master (a hint: another thread may be queueing now)."""
        return bool(self._outbox)

    def flush(self) -> bool:
        """Write what the socket takes; True when nothing is left. Raises when the master is gone."""
        with self._lock:
            drained = self._outbox.flush(self.control)
            self._outbox.forget_sent()  # nobody reads back what a worker sent: no record to keep
            self._flush_early_at = self._outbox.message_bytes + EARLY_FLUSH_BYTES
            return drained

    def close(self) -> None:
        self.closed = True
        self.waker.close()
