"""The worker's record of the connections it was handed: which are still open, and who the client is.

Any server may own a handed-off socket, so nothing here relies on the server
saying when it closes one. Instead the worker remembers each connection's
descriptor and the kernel's identity of the socket behind it (``st_dev`` and
``st_ino`` from ``fstat``) and, every ``CLOSE_SWEEP_INTERVAL`` seconds, checks
them: a descriptor that is closed, or now names another socket, is a closed
connection. The worker reports the count to the master (``WorkerSet.connections``).

Precision: a close is seen up to one sweep late; a server that moves a
connection to another descriptor (``dup``) and closes the original is counted
closed at that moment. On macOS, where sockets may report no inode, a closed
descriptor that is reused before the next sweep is not noticed.

The record also keeps the client address the master learned from a proxy
(PROXY protocol or a forwarded header), which ``client_address(sock)`` returns.
"""

from __future__ import annotations

import os
import socket
from typing import Any

__all__ = ["CLOSE_SWEEP_INTERVAL", "ConnectionRecord", "client_address"]

CLOSE_SWEEP_INTERVAL = 0.5


def _identity(fd: int) -> tuple[int, int] | None:
    try:
        stat = os.fstat(fd)
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


class ConnectionRecord:
    """The open connections of this worker process, by descriptor."""

    def __init__(self) -> None:
        # fd -> (socket identity, client address or None)
        self._open: dict[int, tuple[tuple[int, int] | None, tuple[str, int] | None]] = {}
        self.closed_since_sweep = 0

    def __len__(self) -> int:
        return len(self._open)

    def add(self, fd: int, address: tuple[str, int] | None) -> None:
        if fd in self._open:
            self.closed_since_sweep += 1  # the descriptor was closed and reused since the last sweep
        self._open[fd] = (_identity(fd), address)

    def sweep(self) -> int:
        """Forget the connections closed since the last sweep; return how many."""
        closed = [fd for fd, (identity, _) in self._open.items() if _identity(fd) != identity]
        for fd in closed:
            del self._open[fd]
        count, self.closed_since_sweep = self.closed_since_sweep + len(closed), 0
        return count

    def address(self, sock: socket.socket) -> tuple[str, int] | None:
        """The proxy-told client address of ``sock``, if the master sent one and ``sock`` is that connection."""
        fd = sock.fileno()
        entry = self._open.get(fd)
        if entry is None or entry[1] is None or _identity(fd) != entry[0]:
            return None
        return entry[1]


RECORD = ConnectionRecord()


def client_address(sock: socket.socket) -> tuple[str, int]:
    """The client's (address, port) for a socket the worker was handed.

    Behind a trusted proxy (``proxy_protocol`` or ``forwarded_header``) this is the
    address the proxy reported (port 0 when a forwarded header did not tell it);
    otherwise, the socket's peer address. Call it before closing the socket.
    """
    known = RECORD.address(sock)
    if known is not None:
        return known
    peer: Any = sock.getpeername()
    if isinstance(peer, tuple):
        return peer[0], peer[1]
    return "", 0
