"""One TCP bind's ``SO_REUSEPORT`` group: a listener per slot, in slot order, none closed while serving.

The kernel numbers a group's sockets in the order they started listening, and a
socket that stops listening is replaced in that order by the last one. The master
creates every slot's listener itself, in slot order, and keeps each open until the
server stops, so the listener at index ``i`` is slot ``i``'s: a worker that dies or
is replaced closes only its own copy, and clients keep queueing on the master's.
Should a listener stop listening all the same (its socket shut down from a process
that shares it), ``replace`` follows the kernel's rule in ``order`` (kernel index ->
slot), and the program maps each slot to its index from then on.

A group cannot tell a stranger from a member: any socket of the same user bound to
the same address with ``SO_REUSEPORT`` joins it. So the address is first claimed by
a plain socket (``SO_REUSEADDR`` only, never listening): if anything listens there
already, that bind fails as a plain server's would (``EADDRINUSE``), instead of
the group silently sharing a port with another server. Port 0 gets its number there.
"""

from __future__ import annotations

import errno
import os
import socket
import struct
import sys
from typing import Any

from ..listener import (
    DEFAULT_BACKLOG,
    Bind,
    bind_error,
    defer_accept,
    format_address,
    listen_at,
    resolve_address,
    validate_port,
)

__all__ = ["ListenerGroup", "holders", "listening_inodes", "queue_length"]

# struct tcp_info: for a listening socket, tcpi_unacked is its accept queue's length (tcp_get_info).
_TCP_INFO_SIZE = 32
_TCPI_UNACKED_OFFSET = 24
_TCP_LISTEN = 10  # tcpi_state, the first byte


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

    def __init__(self, bind: Bind, backlog: int = DEFAULT_BACKLOG, defer_accept: bool = False) -> None:
        self._defer_accept = defer_accept  # accept only once data has come (route_by: the head is there)
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
            self.order: list[int | None] = [0]  # kernel index -> slot (None: a socket not ours)
        except OSError as exc:
            raise bind_error(format_address(address), exc) from None
        finally:
            claim.close()

    def _listen(self) -> socket.socket:
        listener = listen_at(self._family, self.address, self._dualstack, self._backlog, reuse_port=True)
        if self._defer_accept:
            defer_accept(listener)
        return listener

    def listener(self, slot: int) -> socket.socket:
        """``slot``'s listener, joining the group (with every slot before it) if it has none yet."""
        while len(self.listeners) <= slot:
            self.listeners.append(self._listen())
            self.order.append(len(self.listeners) - 1)
        return self.listeners[slot]

    def index_of(self, slot: int) -> int:
        """``slot``'s listener's index in the kernel's group."""
        return self.order.index(slot)

    def listening(self, slot: int) -> bool:
        """False once ``slot``'s listener has stopped listening (shut down, disconnected)."""
        if not sys.platform.startswith("linux"):
            return True
        try:
            info = self.listeners[slot].getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)
        except OSError:
            return False
        return info[0] == _TCP_LISTEN

    def replace(self, slot: int) -> socket.socket:
        """A new listener for ``slot``, whose old one stopped listening and so left the group.

        The kernel filled the old one's index with its last socket; the new one joins at the end.
        """
        # Sockets not ours joined after ours (the claim kept them out before): they are at the end.
        self.order.extend([None] * (len(self.strangers()) - self.order.count(None)))
        index = self.order.index(slot)
        last = self.order.pop()
        if index < len(self.order):
            self.order[index] = last
        self.listeners[slot].close()
        self.listeners[slot] = self._listen()
        self.order.append(slot)
        return self.listeners[slot]

    def live_listener(self) -> socket.socket:
        """A listener still in the group (the program is attached through any one of them)."""
        for slot in range(len(self.listeners)):
            if self.listening(slot):
                return self.listeners[slot]
        raise OSError(errno.ENOTCONN, "no listener of the group is listening")

    def strangers(self) -> list[int]:
        """Inodes of sockets listening on this group's address that are not this group's (Linux, else [])."""
        ours = {os.fstat(listener.fileno()).st_ino for listener in self.listeners}
        return [inode for inode in listening_inodes(self.address) if inode not in ours]

    def close(self) -> None:
        for listener in self.listeners:
            listener.close()


def _hex_address(address: tuple[Any, ...]) -> str:
    """The local address as /proc/net/tcp and tcp6 print it (each 32-bit word in host order)."""
    if ":" in address[0]:
        words = struct.unpack("=4I", socket.inet_pton(socket.AF_INET6, address[0]))
        return "".join(f"{word:08X}" for word in words) + f":{address[1]:04X}"
    (word,) = struct.unpack("=I", socket.inet_aton(address[0]))
    return f"{word:08X}:{address[1]:04X}"


def listening_inodes(address: tuple[Any, ...]) -> list[int]:
    """The inodes of every socket listening on exactly ``address`` (Linux's /proc/net; [] elsewhere)."""
    wanted = _hex_address(address)
    inodes = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            with open(table) as file:
                next(file, None)
                for line in file:
                    fields = line.split()
                    if len(fields) > 9 and fields[3] == "0A" and fields[1] == wanted:
                        inodes.append(int(fields[9]))
        except OSError:
            continue
    return inodes


def holders(inodes: list[int]) -> list[int]:
    """The pids of the processes holding sockets with these inodes (those this process may look at)."""
    names = {f"socket:[{inode}]" for inode in inodes}
    pids = []
    for entry in os.listdir("/proc") if os.path.isdir("/proc") else []:
        if not entry.isdigit():
            continue
        try:
            links = os.listdir(f"/proc/{entry}/fd")
            if any(os.readlink(f"/proc/{entry}/fd/{fd}") in names for fd in links):
                pids.append(int(entry))
        except OSError:
            continue
    return pids
