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
socket is reported readable only when they are there, or on EOF. The option is put
back to 1 before the hand-off, so the worker's server sees an ordinary socket.

Readable with nothing new is not EOF: Linux also reports a socket readable below
its low-water mark when the socket runs low on receive memory (a header sent in
many tiny segments), and Unix sockets ignore the mark. Only a peek of zero bytes,
or (Linux) a TCP state that says the peer sent its FIN, is EOF. Otherwise the
connection leaves the selector and is peeked again every ``HEADER_POLL_INTERVAL``
seconds until its header is in or ``header_timeout`` passes, so the loop never spins.

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

from ..balancer import ClientInfo
from ..proxy import (
    ClientAddressSettings,
    ForwardedHeaderError,
    ProxyHeader,
    ProxyHeaderError,
    client_from_forwarded,
    forwarded_addresses,
    may_be_http,
    parse_proxy_header,
    request_head_length,
)
from ..sessions import session_key
from ..util.throttle import ThrottledLog

__all__ = ["Intake"]

logger = logging.getLogger("sticky_server.intake")

# How often at most each kind of rejected connection is logged.
REJECT_LOG_INTERVAL = 10.0
# The first peek of a PROXY header takes this much: a v1 line or a v2 header with IPv6 addresses fits.
PROXY_PEEK = 256
# How often a connection that the selector cannot watch (see the module docstring) is peeked again.
HEADER_POLL_INTERVAL = 0.01
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
# TCP states (linux/tcp_states.h) in which the peer has sent its FIN.
_PEER_CLOSED_STATES = frozenset({7, 8, 9})  # TCP_CLOSE, TCP_CLOSE_WAIT, TCP_LAST_ACK
_TCP_INFO = getattr(socket, "TCP_INFO", None)


def _peer_closed(sock: socket.socket) -> bool:
    """True when the kernel says the peer closed; False when it cannot tell (not Linux, not TCP)."""
    if _TCP_INFO is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, 1)[0] in _PEER_CLOSED_STATES
    except OSError:
        return True


@dataclasses.dataclass(eq=False)
class _Waiting:
    conn_id: int
    sock: socket.socket
    client: ClientInfo
    deadline: float
    seen: int = 0
    needed: int = 0
    low_water: bool = False
    registered: bool = False  # watched by the selector
    poll_at: float | None = None  # peeked again at this time instead (see the module docstring)


ConnectionRoute = Callable[[int, int, ClientInfo], None]
ConnectionFault = Callable[[int, ClientInfo, BaseException], None]


class Intake:
    """Reads the client address of connections from trusted proxies, then routes them."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        settings: ClientAddressSettings,
        route: ConnectionRoute,
        fault: ConnectionFault,
    ):
        """``route(id, fd, client)`` takes a connection whose client is known; ``fault(fd, client, error)``
        takes one whose handling raised unexpectedly (it closes it)."""
        self._selector = selector
        self._settings = settings
        self._trusted = settings.trusted
        self._session = settings.session  # routing by session: every connection's first request is read
        self._line_is_enough = settings.session is not None and settings.session.kind == "engineio"
        self._route = route
        self._fault = fault
        self._waiting: dict[int, _Waiting] = {}  # by descriptor, oldest first
        self._polling: dict[int, _Waiting] = {}  # by descriptor: those peeked on a timer
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
        self._told_no_header = False  # said once: Unix-socket requests without the forwarded header
        self._what = (
            "PROXY protocol header"
            if settings.proxy_protocol
            else f"{settings.forwarded_header} header"
            if settings.forwarded_header
            else "request head"
        )

    @property
    def waiting(self) -> int:
        """How many connections are still sending their header."""
        return len(self._waiting)

    def take(self, conn_id: int, fd: int, family: int, client: ClientInfo) -> None:
        """A new connection: route it now, or once its header is in."""
        if self._session is None and client.host not in self._trusted:
            self._route(conn_id, fd, client)
            return
        try:
            sock = socket.socket(family, socket.SOCK_STREAM, 0, fd)
        except Exception as exc:
            self._fault(fd, client, exc)
            return
        if sock.gettimeout() is not None:
            # socket.setdefaulttimeout() made it non-blocking with a timeout: the peeks
            # below would wait, and the worker would be handed a non-blocking socket.
            sock.setblocking(True)
        self._try_guarded(_Waiting(conn_id, sock, client, time.monotonic() + self._settings.timeout))

    def next_deadline(self) -> float | None:
        earliest = None
        for waiting in self._waiting.values():
            earliest = waiting.deadline
            break
        for waiting in self._polling.values():
            if waiting.poll_at is not None and (earliest is None or waiting.poll_at < earliest):
                earliest = waiting.poll_at
        return earliest

    def expire(self, now: float) -> None:
        """Close the connections whose header did not arrive in time; peek again at those due for it."""
        while self._waiting:
            waiting = next(iter(self._waiting.values()))
            if waiting.deadline > now:
                break
            if self._settings.fallback:
                self._route_as_is(waiting)
                continue
            self._timeout_log.note(1, self._settings.timeout, waiting.client.host)
            self._reject(waiting)
        for fd, waiting in list(self._polling.items()):
            if waiting.poll_at is not None and waiting.poll_at <= now:
                del self._polling[fd]
                waiting.poll_at = None
                self._try_guarded(waiting)

    def close_all(self, why: str) -> None:
        if self._waiting:
            logger.warning("closing %d connection(s) still sending their %s: %s", len(self._waiting), self._what, why)
        for waiting in list(self._waiting.values()):
            self._drop(waiting)

    # --- reading ------------------------------------------------------------------

    def _try_guarded(self, waiting: _Waiting) -> None:
        """``_try``; an unexpected error reading or parsing closes this connection only (master, error handling).

        Once the connection is routed it is the master's: an error from ``route`` is
        a fault in the master's own state and goes up.
        """
        try:
            self._try(waiting)
        except Exception as exc:
            if waiting.sock.fileno() < 0:
                raise
            self._forget(waiting)
            self._fault(waiting.sock.detach(), waiting.client, exc)

    def _try(self, waiting: _Waiting) -> None:
        settings = self._settings
        size = min(settings.max_size, max(PROXY_PEEK, waiting.needed)) if settings.proxy_protocol else settings.max_size
        try:
            data = waiting.sock.recv(size, _PEEK)
        except BlockingIOError:
            data = None
        except OSError as exc:  # reset by the peer, typically
            logger.debug("connection from %s failed before its header: %s", waiting.client.host, exc)
            self._drop(waiting)
            return
        if data is not None and len(data) <= waiting.seen:
            if not data or _peer_closed(waiting.sock):
                logger.debug("connection from %s closed before its header was complete", waiting.client.host)
                self._drop(waiting)
            else:
                self._poll(waiting)  # readable with nothing new: see the module docstring
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

    def _route_as_is(self, waiting: _Waiting) -> None:
        """Route ``waiting`` by its peer (``fallback``): it sent no HTTP request head in time."""
        try:
            self._forget(waiting)
            if waiting.low_water:
                waiting.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            self._drop(waiting)
            return
        self._route(waiting.conn_id, waiting.sock.detach(), waiting.client)

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
        if settings.fallback and not may_be_http(data):
            return 0, peer
        if self._line_is_enough and (settings.forwarded_header is None or peer.host not in self._trusted):
            # An engine.io sid is in the request line: no need to wait for, or scan, the rest of the head.
            line_end = data.find(b"\r\n")
            if line_end >= 0:
                assert self._session is not None
                return 0, peer._replace(session=session_key(data[: line_end + 2], self._session))
        try:
            length = request_head_length(data, settings.max_size) if data else None
        except ForwardedHeaderError:
            if settings.fallback:  # not an HTTP request after all: the application's to deal with
                return 0, peer
            raise
        if length is None:
            return len(data) + 1, None
        head = data[:length]
        client = peer
        if settings.forwarded_header is not None and peer.host in self._trusted:
            client = self._forwarded_client(head, peer)
        if self._session is not None:
            client = client._replace(session=session_key(head, self._session))
        return 0, client

    def _forwarded_client(self, head: bytes, peer: ClientInfo) -> ClientInfo:
        """The client a trusted proxy's forwarded header names (``peer`` itself when it names none)."""
        settings = self._settings
        assert settings.forwarded_header is not None
        host = client_from_forwarded(forwarded_addresses(head, settings.forwarded_header), self._trusted)
        if host is None:
            if not peer.host and not self._told_no_header:
                self._told_no_header = True
                logger.warning(
                    "a request on a Unix socket carries no %s header, so it has no client address to stick to and "
                    "goes to the next worker in turn (sessions such as socket.io's then break). Make the proxy send "
                    "it: nginx 'proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;', HAProxy "
                    "'option forwardfor'",
                    settings.forwarded_header,
                )
            return peer
        return ClientInfo(host, 0, (peer.host, peer.port), peer.local)

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
        self._waiting.setdefault(fd, waiting)
        if not waiting.registered:
            waiting.registered = True
            self._selector.register(fd, selectors.EVENT_READ, lambda mask: self._try_guarded(waiting))

    def _poll(self, waiting: _Waiting) -> None:
        """Peek at ``waiting`` again in ``HEADER_POLL_INTERVAL`` seconds instead of when the selector says."""
        fd = waiting.sock.fileno()
        if waiting.registered:
            waiting.registered = False
            self._selector.unregister(fd)
        self._waiting.setdefault(fd, waiting)
        waiting.poll_at = time.monotonic() + HEADER_POLL_INTERVAL
        self._polling[fd] = waiting

    def _forget(self, waiting: _Waiting) -> None:
        """Stop watching ``waiting`` (if it was waited on at all)."""
        fd = waiting.sock.fileno()
        self._waiting.pop(fd, None)
        self._polling.pop(fd, None)
        if waiting.registered:
            waiting.registered = False
            self._selector.unregister(fd)

    def _reject(self, waiting: _Waiting) -> None:
        """Close a connection that sent a bad header or none in time: a FIN, not a reset, where possible."""
        with contextlib.suppress(OSError):  # unread bytes would make close() send a reset
            waiting.sock.recv(self._settings.max_size, socket.MSG_DONTWAIT)
        self._drop(waiting)

    def _drop(self, waiting: _Waiting) -> None:
        self._forget(waiting)
        waiting.sock.close()
