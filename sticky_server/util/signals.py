"""Signals as selector events: handlers only record, the owner's loop dispatches.

As in gunicorn's arbiter, a signal handler does nothing but let Python write the
signal number to a wake-up socket (``signal.set_wakeup_fd``); the process's event
loop sees that socket readable, reads the numbers and calls its own handlers
there, outside signal context.
"""

from __future__ import annotations

import signal
import socket
import threading
from collections.abc import Iterable
from types import FrameType
from typing import Any

__all__ = ["SignalQueue"]


def _record_only(signum: int, frame: FrameType | None) -> None:
    """Installed so that the signal wakes the loop; the wake-up fd carries the number."""


class SignalQueue:
    """Route ``signums`` to a socket the caller watches; ``restore()`` undoes it.

    Only the main thread can install signal handlers; elsewhere ``installed`` is
    False and nothing is changed.
    """

    def __init__(self, signums: Iterable[int]) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._previous: dict[int, Any] = {}
        self._previous_wakeup_fd = -1
        self.installed = threading.current_thread() is threading.main_thread()
        if not self.installed:
            return
        self._previous_wakeup_fd = signal.set_wakeup_fd(self._writer.fileno(), warn_on_full_buffer=False)
        for signum in signums:
            self._previous[signum] = signal.signal(signum, _record_only)

    def fileno(self) -> int:
        """The descriptor to watch for readability."""
        return self._reader.fileno()

    def drain(self) -> list[int]:
        """The signal numbers received since the last call, in order."""
        received: list[int] = []
        while True:
            try:
                data = self._reader.recv(4096)
            except (BlockingIOError, InterruptedError):
                return received
            if not data:
                return received
            received.extend(data)

    def restore(self) -> None:
        """Put back the handlers and wake-up fd that were there before; close the sockets."""
        if self.installed:
            for signum, handler in self._previous.items():
                signal.signal(signum, handler)
            signal.set_wakeup_fd(self._previous_wakeup_fd)
            self.installed = False
        self._reader.close()
        self._writer.close()
