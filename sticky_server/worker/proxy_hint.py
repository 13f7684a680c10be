"""Noticing a proxy in front that nobody told the server about (worker side).

Behind nginx over TCP with no proxy setting, every connection comes from the
proxy's address, so IP hash puts every client on one worker, silently. With no
proxy setting on, each worker looks at the first ``SAMPLE`` connections it gets
from a local peer (loopback or a Unix socket, where a reverse proxy on the same
machine connects from) by peeking, never reading, at the request head already in
the socket's buffer. If requests from one such peer name two or more different
clients in ``X-Forwarded-For`` or ``Forwarded``, it logs one WARNING naming the fix,
and looks no further. A peek that finds nothing yet is not waited for.
"""

from __future__ import annotations

import logging
import socket

from ..proxy import DEFAULT_TRUSTED_PROXIES, TrustedProxies, canonical_ip, forwarded_addresses

__all__ = ["SAMPLE", "ProxyHint"]

logger = logging.getLogger("sticky_server.worker")

# Connections looked at, at most, before the hint gives up: the hot path then pays nothing.
SAMPLE = 64
PEEK_BYTES = 4096
_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT
_HEADERS = ("x-forwarded-for", "forwarded")
_LOCAL = TrustedProxies(DEFAULT_TRUSTED_PROXIES)


class ProxyHint:
    """Looks at a worker's first connections; True from ``look`` once it has nothing more to do."""

    def __init__(self, slot: int) -> None:
        self._slot = slot
        self._looked = 0
        self._clients: dict[str, set[str]] = {}  # proxy address -> the clients its requests named

    def look(self, sock: socket.socket) -> bool:
        self._looked += 1
        try:
            peer = sock.getpeername()
            proxy = peer[0] if isinstance(peer, tuple) else "a Unix socket"
            if isinstance(peer, tuple) and peer[0] not in _LOCAL:
                return self._looked >= SAMPLE
            data = sock.recv(PEEK_BYTES, _PEEK)
        except OSError:  # nothing in the buffer yet, or the client has gone: not worth a wait
            return self._looked >= SAMPLE
        head = data.partition(b"\r\n\r\n")[0]
        for header in _HEADERS:
            if header.encode() in head.lower():
                named = {canonical_ip(address) for address in forwarded_addresses(head, header)}
                clients = self._clients.setdefault(proxy, set())
                clients.update(address for address in named if address is not None)
                if len(clients) >= 2:
                    self._warn(proxy, header)
                    return True
        return self._looked >= SAMPLE

    def _warn(self, proxy: str, header: str) -> None:
        name = "X-Forwarded-For" if header == "x-forwarded-for" else "Forwarded"
        logger.warning(
            "worker %d: requests from the proxy at %s name different clients in %s, but connections are routed "
            "by the proxy's own address, so every client it forwards lands on one worker. Restart with "
            "--proxy-headers (StickyServer(forwarded_header=%r)) to route by the header from trusted proxies "
            "(--forwarded-allow-ips; default loopback), or have the proxy send the PROXY protocol and use "
            "--proxy-protocol",
            self._slot,
            proxy,
            name,
            header,
        )
