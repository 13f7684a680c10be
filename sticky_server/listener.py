"""Binding the master's listening socket, with errors that say what to do."""

from __future__ import annotations

import errno
import socket
from typing import Any

from .errors import BindError

__all__ = ["DEFAULT_BACKLOG", "bind_listener", "format_address", "validate_port"]

# The kernel caps this at its own limit (net.core.somaxconn on Linux); a small
# backlog makes a burst of connections stall in SYN retries.
DEFAULT_BACKLOG = 4096

_BIND_ADVICE = {
    errno.EADDRINUSE: "the address is already in use. Stop the program holding it, or choose another port "
    "(port 0 picks a free one)",
    errno.EACCES: "permission denied. Ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port of 1024 or above",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address. Use one of its addresses, "
    "or host=None for all of them",
}


def validate_port(port: object) -> int:
    """Return ``port`` if it is a TCP port number; raise TypeError/ValueError naming the fix."""
    if isinstance(port, bool) or not isinstance(port, int):
        hint = f" (use int({port!r}))" if isinstance(port, str) and port.isdigit() else ""
        raise TypeError(f"port must be an int from 0 to 65535, not {type(port).__name__} {port!r}{hint}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be from 0 to 65535 (0 picks a free port), got {port}")
    return port


def format_address(address: Any) -> str:
    """'127.0.0.1:3000' or '[::1]:3000' for a socket address tuple."""
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_error(where: str, exc: OSError) -> BindError:
    advice = _BIND_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
    return BindError(exc.errno or 0, f"cannot listen on {where}: {advice}")


def bind_listener(port: int, host: str | None = None, backlog: int = DEFAULT_BACKLOG) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; raises BindError with the reason and the fix.

    ``host=None`` (or ``""``) listens on every interface, IPv6 and IPv4 on one
    socket where the system can, IPv4 only where it cannot.
    """
    validate_port(port)
    address: tuple[Any, ...]
    if host is None or host == "":
        if socket.has_dualstack_ipv6():
            family, address, dualstack = socket.AF_INET6, ("::", port, 0, 0), True
        else:
            family, address, dualstack = socket.AF_INET, ("0.0.0.0", port), False
    elif isinstance(host, str):
        try:
            infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
        except socket.gaierror as exc:
            raise BindError(
                errno.EADDRNOTAVAIL,
                f"cannot listen on {host!r}: the name does not resolve ({exc.strerror}). "
                "Use an IP address, or host=None for every interface",
            ) from None
        family, _, _, _, address = infos[0]
        dualstack = False
    else:
        raise TypeError(f"host must be a str (an address or name) or None for every interface, not {host!r}")
    where = format_address(address)
    try:
        listener = socket.create_server(address, family=family, backlog=backlog, dualstack_ipv6=dualstack)
    except OSError as exc:
        raise _bind_error(where, exc) from None
    listener.setblocking(False)
    return listener
