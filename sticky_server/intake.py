"""Learning the real client address of a new connection before it is routed.

Theory of operation
-------------------
With ``proxy_protocol`` or ``forwarded_header`` on, a connection from a trusted
proxy is not routed at once: the master first reads what the proxy says about
the client. It never takes an application byte from the stream:

- PROXY protocol: the master peeks (``MSG_PEEK``) until the whole header is in
  the socket's buffer, then reads exactly the header's length. The worker's
  server reads the application stream from its first byte.
- Forwarded header: the master peeks until the whole HTTP request head is in the
  buffer and reads nothing, so the worker's server sees the request intact.

Peeking alone would make a level-triggered selector report the socket readable
again and again while the rest of a header is on its way. So when a header is
incomplete the master sets ``SO_RCVLOWAT`` to the number of bytes it needs: the
socket is reported readable only when they are there (or on EOF, which a peek
that finds nothing new tells apart). The option is put back to 1 before the
hand-off, so the worker's server sees an ordinary socket.

Connections from peers outside ``trusted_proxies`` are routed at once by their
socket address and nothing is read: a header they send is the application's to
deal with. A trusted peer must send a valid header within ``header_timeout``
seconds and ``max_header_size`` bytes; otherwise the connection is closed and
logged (throttled), and every other connection keeps flowing: the reading is
non-blocking and bounded in time and size.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import logging
import selectors
import socket
import time
from collections.abc import Callable

from .balancer import ClientInfo
from .proxy import (
    ForwardedHeaderError,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    client_from_forwarded,
    forwarded_addresses,
    parse_proxy_header,
    request_head_length,
)
from .throttle import ThrottledLog

__all__ = ["ClientAddressSettings", "Intake"]

logger = logging.getLogger("sticky_server.intake")

# How often at most each kind of rejected connection is logged.
REJECT_LOG_INTERVAL = 10.0
# The first peek of a PROXY header takes this much: a v1 line or a v2 header with IPv6 addresses fits.
PROXY_PEEK = 256
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT


@dataclasses.dataclass(frozen=True)
class ClientAddressSettings:
    """How the master learns client addresses from proxies (see ``StickyServer``)."""

    proxy_protocol: bool
    forwarded_header: str | None
    trusted: TrustedProxies
    timeout: float
    max_size: int


@dataclasses.dataclass(eq=False)
class _Waiting:
    conn_id: int
    sock: socket.socket
    client: ClientInfo
    deadline: float
    seen: int = 0
    needed: int = 0
    low_water: bool = False


ConnectionRoute = Callable[[int, int, ClientInfo], None]


class Intake:
    """Reads the client address of connections from trusted proxies, then routes them."""

    def __init__(self, selector: selectors.BaseSelector, settings: ClientAddressSettings, route: ConnectionRoute):
        self._selector = selector
        self._settings = settings
        self._trusted = settings.trusted
        self._route = route
        self._waiting: dict[int, _Waiting] = {}  # by descriptor, oldest first
        self._rejected_log = ThrottledLog(
            logger,
            logging.WARNING,
            "closed %d connection(s) from trusted proxies with a bad header (latest from %s: %s)",
            REJECT_LOG_INTERVAL,
        )
        self._timeout_log = ThrottledLog(
            logger,
            logging.WARNING,
            "closed %d connection(s) that sent no complete header within %.1f s (latest from %s)",
            REJECT_LOG_INTERVAL,
        )
        self._what = "PROXY protocol header" if settings.proxy_protocol else f"{settings.forwarded_header} header"

    @property
    def waiting(self) -> int:
        """How many connections are still sending their header."""
        return len(self._waiting)

    def take(self, conn_id: int, fd: int, family: int, client: ClientInfo) -> None:
        """A new connection: route it now, or once its header is in."""
        if client.host not in self._trusted:
            self._route(conn_id, fd, client)
            return
        sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        if sock.gettimeout() is not None:
            # socket.setdefaulttimeout() made it non-blocking with a timeout: the peeks
            # below would wait, and the worker would be handed a non-blocking socket.
            sock.setblocking(True)
        self._try(_Waiting(conn_id, sock, client, time.monotonic() + self._settings.timeout))

    def next_deadline(self) -> float | None:
        for waiting in self._waiting.values():
            return waiting.deadline
        return None

    def expire(self, now: float) -> None:
        """Close the connections whose header did not arrive in time."""
        while self._waiting:
            waiting = next(iter(self._waiting.values()))
            if waiting.deadline > now:
                return
            self._timeout_log.note(1, self._settings.timeout, waiting.client.host)
            self._reject(waiting)

    def close_all(self, why: str) -> None:
        if self._waiting:
            logger.warning("closing %d connection(s) still sending their %s: %s", len(self._waiting), self._what, why)
        for waiting in list(self._waiting.values()):
            self._drop(waiting)

    # --- reading ------------------------------------------------------------------

    def _try(self, waiting: _Waiting) -> None:
        settings = self._settings
        size = (
            settings.max_size if settings.forwarded_header else min(settings.max_size, max(PROXY_PEEK, waiting.needed))
        )
        try:
            data = waiting.sock.recv(size, _PEEK)
        except BlockingIOError:
            data = None
        except OSError as exc:  # reset by the peer, typically
            logger.debug("connection from %s failed before its header: %s", waiting.client.host, exc)
            self._drop(waiting)
            return
        if data is not None and len(data) <= waiting.seen:
            # Readable, yet nothing new: the peer closed (SO_RCVLOWAT holds back partial data).
            logger.debug("connection from %s closed before its header was complete", waiting.client.host)
            self._drop(waiting)
            return
        try:
            needed, client = self._parse(data or b"", waiting.client)
        except (ProxyHeaderError, ForwardedHeaderError) as exc:
            self._rejected_log.note(1, waiting.client.host, exc)
            self._reject(waiting)
            return
        if client is None:
            self._wait(waiting, needed, len(data or b""))
            return
        if needed and not self._consume(waiting, needed):
            self._drop(waiting)
            return
        self._forget(waiting)
        if waiting.low_water:
            waiting.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        self._route(waiting.conn_id, waiting.sock.detach(), client)

    def _parse(self, data: bytes, peer: ClientInfo) -> tuple[int, ClientInfo | None]:
        """(bytes to consume, client) when complete; (bytes needed, None) when not. Raises on a bad header."""
        settings = self._settings
        if settings.proxy_protocol:
            header = parse_proxy_header(data, settings.max_size) if data else 1
            if not isinstance(header, ProxyHeader):
                return header, None
            if header.source is None:
                return header.length, peer  # a health check (LOCAL/UNKNOWN): the proxy itself
            return header.length, ClientInfo(header.source[0], header.source[1], (peer.host, peer.port), peer.local)
        assert settings.forwarded_header is not None
        length = request_head_length(data, settings.max_size) if data else None
        if length is None:
            return len(data) + 1, None
        host = client_from_forwarded(forwarded_addresses(data[:length], settings.forwarded_header), self._trusted)
        if host is None:
            return 0, peer
        return 0, ClientInfo(host, 0, (peer.host, peer.port), peer.local)

    def _consume(self, waiting: _Waiting, length: int) -> bool:
        """Read exactly the header's bytes (they are in the buffer: the peek saw them)."""
        try:
            return len(waiting.sock.recv(length, socket.MSG_DONTWAIT)) == length
        except OSError as exc:
            logger.debug("connection from %s failed while its header was read: %s", waiting.client.host, exc)
            return False

    def _wait(self, waiting: _Waiting, needed: int, seen: int) -> None:
        waiting.seen, waiting.needed = seen, needed
        try:
            waiting.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, needed)
        except OSError as exc:
            if exc.errno not in (errno.EINVAL, errno.ENOPROTOOPT):
                raise
        else:
            waiting.low_water = True
        fd = waiting.sock.fileno()
        if fd not in self._waiting:
            self._waiting[fd] = waiting
            self._selector.register(fd, selectors.EVENT_READ, lambda mask: self._try(waiting))

    def _forget(self, waiting: _Waiting) -> None:
        """Stop watching ``waiting`` (if it was waited on at all)."""
        if self._waiting.pop(waiting.sock.fileno(), None) is not None:
            self._selector.unregister(waiting.sock.fileno())

    def _reject(self, waiting: _Waiting) -> None:
        """Close a connection that sent a bad header or none in time: a FIN, not a reset, where possible."""
        with contextlib.suppress(OSError):  # unread bytes would make close() send a reset
            waiting.sock.recv(self._settings.max_size, socket.MSG_DONTWAIT)
        self._drop(waiting)

    def _drop(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        waiting.sock.close()
