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

Each handed-off socket is a ``HandedOffSocket``: its ``getpeername()`` and
``getsockname()`` answer what a server running alone would see, so every
framework's own idea of the client (``scope["client"]``, ``request.remote``,
``REMOTE_ADDR``) is right with no adapter code:

- behind a PROXY-protocol proxy, the peer is the client the header named (the
  proxy said so for the whole connection);
- an IPv4 client of a dual-stack listener is ``("127.0.0.1", port)``, not
  ``("::ffff:127.0.0.1", port, 0, 0)``, so proxy allow-lists such as uvicorn's
  ``forwarded_allow_ips`` match it.

A forwarded header is per request, so there the peer stays the proxy: the
framework's own proxy-header handling (given ``trusted_proxies``) reads each
request's header.
"""

from __future__ import annotations

import _socket
import os
import socket
from typing import Any

__all__ = ["CLOSE_SWEEP_INTERVAL", "ConnectionRecord", "HandedOffSocket", "ProxiedSocket", "client_address", "unmapped"]

CLOSE_SWEEP_INTERVAL = 0.5
_MAPPED_PREFIX = "::ffff:"
_getpeername = socket.socket.getpeername
_getsockname = socket.socket.getsockname
# The C socket's plain ints, and the enum members socket.socket's properties make of them.
_c_family = _socket.socket.family
_c_type = _socket.socket.type
_FAMILIES = {int(family): family for family in socket.AddressFamily}
_KINDS = {int(kind): kind for kind in socket.SocketKind}


def unmapped(address: Any) -> Any:
    """``address`` with an IPv4-mapped IPv6 host (``::ffff:a.b.c.d``) as the IPv4 ``(host, port)`` it stands for."""
    if type(address) is tuple and len(address) == 4 and address[0].startswith(_MAPPED_PREFIX) and "." in address[0]:
        return address[0][len(_MAPPED_PREFIX) :], address[1]
    return address


class HandedOffSocket(socket.socket):
    """A connection the master handed over, telling its addresses as a server running alone sees them.

    ``told_peer``: the client a PROXY-protocol header named, or None to ask the
    kernel. Costs nothing until an address is asked for.
    """

    __slots__ = ()  # no per-connection __dict__
    told_peer: tuple[str, int] | None = None

    # Asked once per connection by most servers: the common case (an IPv4 peer, a
    # 2-tuple) costs one attribute read and a length check more than the plain call.
    def getpeername(self) -> Any:
        told = self.told_peer
        if told is not None:
            return told
        peer = _getpeername(self)
        return unmapped(peer) if len(peer) == 4 else peer

    def getsockname(self) -> Any:
        local = _getsockname(self)
        return unmapped(local) if len(local) == 4 else local

    # Read by every event loop and server per connection (uvloop twice): socket.socket's
    # properties build the enum member by calling the enum; a table lookup gives the same one.
    @property
    def family(self) -> socket.AddressFamily:
        value: int = _c_family.__get__(self)
        return _FAMILIES.get(value, value)  # type: ignore[arg-type]  # an int socket.socket leaves as is

    @property
    def type(self) -> socket.SocketKind:
        value: int = _c_type.__get__(self)
        return _KINDS.get(value, value)  # type: ignore[arg-type]  # an int socket.socket leaves as is


class ProxiedSocket(HandedOffSocket):
    """A ``HandedOffSocket`` whose client a PROXY-protocol header named (set ``told_peer`` once made)."""

    __slots__ = ("told_peer",)

    def dup(self) -> ProxiedSocket:
        twin = super().dup()  # socket.dup makes one of this class
        twin.told_peer = self.told_peer
        return twin


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
