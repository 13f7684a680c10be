"""Waking a selector loop from other threads, one byte per burst of wakes."""

from __future__ import annotations

import contextlib
import socket
import threading

__all__ = ["Waker"]


class Waker:
    """The loop watches ``fileno()``; any thread calls ``wake()``; the loop calls ``clear()``.

    Only the first ``wake()`` after a ``clear()`` writes a byte, so a burst of wakes
    costs one syscall. The loop must ``clear()`` before it handles what the wakes
    were for: then a wake that comes after the clear writes a new byte, and none is missed.
    """

    def __init__(self) -> None:
        self._reader, self._writer = socket.socketpair()
        self._reader.setblocking(False)
        self._writer.setblocking(False)
        self._lock = threading.Lock()
        self._pending = False

    def fileno(self) -> int:
        return self._reader.fileno()

    def wake(self) -> None:
        with self._lock:
            wake, self._pending = not self._pending, True
        if wake:
            with contextlib.suppress(BlockingIOError, OSError):  # full: a wake is pending; closed: stopping
                self._writer.send(b"\0")

    def clear(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._reader.recv(4096):
                pass
        with self._lock:
            self._pending = False

    def close(self) -> None:
        self._reader.close()
        self._writer.close()
