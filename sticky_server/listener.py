"""Binding the master's listening socket, with errors that say what to do."""

from __future__ import annotations

import errno
import os
import socket
import stat
from collections.abc import Iterator
from typing import Any, NamedTuple

from .errors import BindError

__all__ = [
    "ABORTED_BEFORE_ACCEPT",
    "ACCEPT_BACKOFF",
    "ACCEPT_BURST",
    "DEFAULT_BACKLOG",
    "DEFAULT_UNIX_SOCKET_MODE",
    "OUT_OF_DESCRIPTORS",
    "Bind",
    "OutOfDescriptors",
    "accept_waiting",
    "adopt_listener",
    "bind_error",
    "bind_listener",
    "bind_unix_listener",
    "format_address",
    "listen_at",
    "open_bind",
    "parse_bind",
    "resolve_address",
    "takes_mapped_ipv4",
    "validate_port",
]

# Connections taken from a listener per wake-up, before the loop looks at anything else.
ACCEPT_BURST = 64
# Accepting pauses this long (seconds) when the process has no descriptor left for a connection.
ACCEPT_BACKOFF = 0.1
OUT_OF_DESCRIPTORS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})
# The client went away between the handshake and accept(): nothing to serve.
ABORTED_BEFORE_ACCEPT = frozenset({errno.ECONNABORTED, errno.EPROTO, errno.EPERM})
# The kernel caps this at its own limit (net.core.somaxconn on Linux); a small
# backlog makes a burst of connections stall in SYN retries.
DEFAULT_BACKLOG = 4096
# uvicorn's mode for its Unix socket: a proxy running as another user (nginx as www-data) can connect.
DEFAULT_UNIX_SOCKET_MODE = 0o666
# listen() takes a C int; the kernel caps it far lower (net.core.somaxconn) anyway.
MAX_BACKLOG = 2**31 - 1

_BIND_ADVICE = {
    errno.EADDRINUSE: "the address is already in use. Stop the program holding it, or choose another port "
    "(port 0 picks a free one)",
    errno.EACCES: "permission denied. Ports below 1024 need root or CAP_NET_BIND_SERVICE; use a port of 1024 or above",
    errno.EADDRNOTAVAIL: "no interface of this machine has that address. Use one of its addresses, "
    "or host=None for all of them",
}


class OutOfDescriptors(OSError):
    """``accept`` failed for lack of descriptors or memory (``OUT_OF_DESCRIPTORS``): pause, do not spin."""


def accept_waiting(listener: socket.socket, limit: int) -> Iterator[tuple[int, Any]]:
    """Up to ``limit`` ``(descriptor, address)`` pairs waiting on non-blocking ``listener``; stops when none waits.

    Skips connections aborted before ``accept``; raises ``OutOfDescriptors`` when the
    process has no descriptor for the next one (it stays queued in the kernel).
    """
    # socket._accept() returns the raw descriptor and address: no socket object is built
    # for a connection the caller passes on or wraps itself.
    accept = listener._accept  # type: ignore[attr-defined]
    for _ in range(limit):
        try:
            yield accept()
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno in ABORTED_BEFORE_ACCEPT:
                continue
            if exc.errno in OUT_OF_DESCRIPTORS:
                raise OutOfDescriptors(exc.errno, exc.strerror) from None
            raise


def validate_port(port: object) -> int:
    """Return ``port`` if it is a TCP port number; raise TypeError/ValueError naming the fix."""
    if isinstance(port, bool) or not isinstance(port, int):
        hint = f" (use int({port!r}))" if isinstance(port, str) and port.isdigit() else ""
        raise TypeError(f"port must be an int from 0 to 65535, not {type(port).__name__} {port!r}{hint}")
    if not 0 <= port <= 65535:
        raise ValueError(f"port must be from 0 to 65535 (0 picks a free port), got {port}")
    return port


def format_address(address: Any) -> str:
    """'127.0.0.1:3000' or '[::1]:3000' for a socket address tuple; 'unix:/path' for a Unix socket's."""
    if isinstance(address, (str, bytes)):
        return f"unix:{os.fsdecode(address)}"
    host, port = address[0], address[1]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def bind_error(where: str, exc: OSError) -> BindError:
    advice = _BIND_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
    return BindError(exc.errno or 0, f"cannot listen on {where}: {advice}")


def resolve_address(port: int, host: str | None) -> tuple[socket.AddressFamily, tuple[Any, ...], bool]:
    """(family, address, dual-stack) for a TCP bind; BindError when ``host`` does not resolve.

    ``host=None`` (or ``""``) is every interface, IPv6 and IPv4 on one socket where
    the system can, IPv4 only where it cannot.
    """
    if host is None or host == "":
        if socket.has_dualstack_ipv6():
            return socket.AF_INET6, ("::", port, 0, 0), True
        return socket.AF_INET, ("0.0.0.0", port), False
    if not isinstance(host, str):
        raise TypeError(f"host must be a str (an address or name) or None for every interface, not {host!r}")
    try:
        infos = socket.getaddrinfo(host, port, socket.AF_UNSPEC, socket.SOCK_STREAM, 0, socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise BindError(
            errno.EADDRNOTAVAIL,
            f"cannot listen on {host!r}: the name does not resolve ({exc.strerror}). "
            "Use an IP address, or host=None for every interface",
        ) from None
    family, _, _, _, address = infos[0]
    return family, address, False


def bind_listener(
    port: int, host: str | None = None, backlog: int = DEFAULT_BACKLOG, *, reuse_port: bool = False
) -> socket.socket:
    """A bound, listening, non-blocking TCP socket; raises BindError with the reason and the fix.

    ``host=None`` (or ``""``) listens on every interface, IPv6 and IPv4 on one
    socket where the system can, IPv4 only where it cannot.
    """
    validate_port(port)
    family, address, dualstack = resolve_address(port, host)
    return listen_at(family, address, dualstack, backlog, reuse_port=reuse_port)


def listen_at(
    family: socket.AddressFamily,
    address: tuple[Any, ...],
    dualstack: bool,
    backlog: int = DEFAULT_BACKLOG,
    *,
    reuse_port: bool = False,
) -> socket.socket:
    """``bind_listener`` for an address ``resolve_address`` gave."""
    try:
        listener = socket.create_server(
            address, family=family, backlog=backlog, reuse_port=reuse_port, dualstack_ipv6=dualstack
        )
    except OSError as exc:
        raise bind_error(format_address(address), exc) from None
    listener.setblocking(False)
    return listener


class Bind(NamedTuple):
    """Where to listen: a TCP host and port (host None: every interface), a Unix socket path,
    or a listening socket this process inherited, by descriptor (socket activation)."""

    host: str | None
    port: int
    path: str | None = None
    fd: int | None = None


_BIND_FORMS = "HOST:PORT, [IPV6]:PORT, :PORT or PORT (every interface), unix:/PATH, or fd://N"


def parse_bind(text: str) -> Bind:
    """A ``Bind`` from its text form (``_BIND_FORMS``); ValueError naming the forms otherwise."""
    if not isinstance(text, str):
        raise TypeError(f"a bind must be a str such as '127.0.0.1:3000', not {text!r}")
    if text.startswith("fd://"):
        number = text[len("fd://") :]
        if not number.isdigit():
            raise ValueError(f"bind {text!r} has no descriptor number; use fd://3 for descriptor 3")
        return Bind(None, 0, None, int(number))
    if text.startswith("unix:"):
        path = text[len("unix:") :]
        if not path:
            raise ValueError(f"bind {text!r} has no path; use unix:/path/to/socket")
        return Bind(None, 0, path)
    host: str | None
    if text.startswith("["):
        host, sep, port_text = text[1:].partition("]:")
        if not sep:
            raise ValueError(f"bind {text!r} is not one of {_BIND_FORMS}")
    elif ":" in text:
        host, _, port_text = text.rpartition(":")
    else:
        host, port_text = None, text
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"bind {text!r} has no port from 0 to 65535; use one of {_BIND_FORMS}")
    return Bind(host or None, int(port_text))


def bind_unix_listener(
    path: str, backlog: int = DEFAULT_BACKLOG, mode: int = DEFAULT_UNIX_SOCKET_MODE
) -> socket.socket:
    """A listening, non-blocking Unix stream socket at ``path`` with file mode ``mode``.

    A stale socket file left there is replaced. The mode is set before ``listen``,
    so no client connects through the umask's narrower one.
    """
    try:
        existing = os.stat(path).st_mode
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(existing):
            raise BindError(errno.EEXIST, f"cannot listen on unix:{path}: a file that is not a socket is there")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except (ConnectionRefusedError, FileNotFoundError):
                os.unlink(path)  # nobody listens: left by a server that did not clean up
            except OSError as exc:
                raise bind_error(f"unix:{path}", exc) from None
            else:
                raise BindError(errno.EADDRINUSE, f"cannot listen on unix:{path}: another server listens there")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        listener.bind(path)
        os.chmod(path, mode)
        listener.listen(backlog)
    except OSError as exc:
        listener.close()
        raise bind_error(f"unix:{path}", exc) from None
    listener.setblocking(False)
    return listener


def adopt_listener(fd: int) -> socket.socket:
    """The listening stream socket this process inherited as descriptor ``fd`` (from systemd, or a supervisor)."""
    try:
        listener = socket.socket(fileno=fd)
    except OSError as exc:
        raise BindError(exc.errno or errno.EBADF, f"cannot listen on fd://{fd}: it is not an open socket") from None
    try:
        listening = listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError:
        listening = 1  # macOS has no SO_ACCEPTCONN for every socket kind: accept() will tell
    if listener.type != socket.SOCK_STREAM or not listening:
        listener.detach()
        raise BindError(
            errno.EINVAL, f"cannot listen on fd://{fd}: it is not a listening stream socket (bind and listen it first)"
        )
    listener.setblocking(False)
    return listener


def open_bind(bind: Bind, backlog: int = DEFAULT_BACKLOG, unix_mode: int = DEFAULT_UNIX_SOCKET_MODE) -> socket.socket:
    """The listening socket for ``bind``; BindError with the reason and the fix."""
    if bind.fd is not None:
        return adopt_listener(bind.fd)
    if bind.path is not None:
        return bind_unix_listener(bind.path, backlog, unix_mode)
    return bind_listener(bind.port, bind.host, backlog)


# With TCP_DEFER_ACCEPT, a connection that sends nothing is accepted after about this long anyway.
DEFER_ACCEPT_SECONDS = 1


def takes_mapped_ipv4(listener: socket.socket) -> bool:
    """Whether ``listener`` is IPv6 and takes IPv4 clients too (their peers then read ``::ffff:a.b.c.d``)."""
    if listener.family != socket.AF_INET6:
        return False
    return not listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


def defer_accept(listener: socket.socket) -> None:
    """Have the kernel hand over a TCP connection only once its first bytes are in (Linux; elsewhere nothing).

    With ``route_by`` whoever accepts peeks at the first request head at once: most
    are there, instead of a wait for readiness and another look for each connection.
    """
    option = getattr(socket, "TCP_DEFER_ACCEPT", None)
    if option is not None and listener.family in (socket.AF_INET, socket.AF_INET6):
        listener.setsockopt(socket.IPPROTO_TCP, option, DEFER_ACCEPT_SECONDS)
