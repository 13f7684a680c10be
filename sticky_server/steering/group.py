"""One TCP bind's ``SO_REUSEPORT`` group: a listener per slot, in slot order, none closed while serving.

The kernel numbers a group's sockets in the order they started listening, and a
socket that closes is replaced in that order by the last one. The master creates
every slot's listener itself, in slot order, and keeps each open until the server
stops, so the listener at index ``i`` is slot ``i``'s for good: a worker that dies
or is replaced closes only its own copy, and clients keep queueing on the master's.

A group cannot tell a stranger from a member: any socket of the same user bound to
the same address with ``SO_REUSEPORT`` joins it. So the address is first claimed by
a plain socket (``SO_REUSEADDR`` only, never listening): if anything listens there
already, that bind fails as a plain server's would (``EADDRINUSE``), instead of
the group silently sharing a port with another server. Port 0 gets its number there.
"""

from __future__ import annotations

import socket
import struct
import sys
from typing import Any

from ..listener import DEFAULT_BACKLOG, Bind, bind_error, format_address, listen_at, resolve_address, validate_port

__all__ = ["ListenerGroup", "queue_length"]

# struct tcp_info: for a listening socket, tcpi_unacked is its accept queue's length (tcp_get_info).
_TCP_INFO_SIZE = 32
_TCPI_UNACKED_OFFSET = 24


def queue_length(listener: socket.socket) -> int:
    """Connections waiting in ``listener``'s accept queue (Linux; 0 where the system does not say)."""
    if not sys.platform.startswith("linux"):
        return 0
    info = listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, _TCP_INFO_SIZE)
    if len(info) < _TCP_INFO_SIZE:
        return 0
    length: int = struct.unpack_from("=I", info, _TCPI_UNACKED_OFFSET)[0]
    return length


class ListenerGroup:
    """The listeners of one TCP bind, ``listeners[slot]`` each slot's (module docstring)."""

    def __init__(self, bind: Bind, backlog: int = DEFAULT_BACKLOG) -> None:
        if bind.path is not None or bind.fd is not None:
            raise ValueError("a listener group is for TCP binds (host and port)")
        validate_port(bind.port)
        self._family, address, self._dualstack = resolve_address(bind.port, bind.host)
        self._backlog = backlog
        claim = socket.socket(self._family, socket.SOCK_STREAM)
        try:
            claim.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self._family == socket.AF_INET6:
                claim.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0 if self._dualstack else 1)
            claim.bind(address)
            self.address: tuple[Any, ...] = claim.getsockname()  # with the port 0 chose
            self.listeners: list[socket.socket] = [self._listen()]
        except OSError as exc:
            raise bind_error(format_address(address), exc) from None
        finally:
            claim.close()

    def _listen(self) -> socket.socket:
        return listen_at(self._family, self.address, self._dualstack, self._backlog, reuse_port=True)

    def listener(self, slot: int) -> socket.socket:
        """``slot``'s listener, joining the group (with every slot before it) if it has none yet."""
        while len(self.listeners) <= slot:
            self.listeners.append(self._listen())
        return self.listeners[slot]

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()
