"""Every setting of a ``StickyServer``, checked in one place: ``ServerSettings``.

``StickyServer(...)`` builds one from its keyword arguments; the command line builds
one from its layered sources (flags, config file, environment) and hands it over
with ``StickyServer.from_settings``, so ``--check-config`` checks exactly what a start
would. A value that cannot work is a ``ValueError`` (or ``TypeError``) naming the
setting, before anything starts. The checked values are resolved where they have a
resolved form: the worker count (a default per CPU), the balancer (a name to an
instance), the user and group (names to ids), the proxy settings
(``client_addresses``).
"""

from __future__ import annotations

import dataclasses
import grp
import os
import pwd
import re
from collections.abc import Callable, Iterable
from typing import Any

from .balancer import Balancer, IPHashBalancer, balancer_from
from .checks import check_count, check_seconds
from .listener import DEFAULT_BACKLOG, DEFAULT_UNIX_SOCKET_MODE, MAX_BACKLOG
from .protocol.frames import MAX_PAYLOAD
from .protocol.messages import DEFAULT_MAX_MESSAGE_SIZE
from .proxy import DEFAULT_TRUSTED_PROXIES, ClientAddressSettings, TrustedProxies
from .sessions import DEFAULT_LOAD_FACTOR, RouteBy, SessionBalancer
from .steering import STEERINGS
from .worker.event_loop import check_loop

__all__ = [
    "DEFAULT_GRACEFUL_TIMEOUT",
    "DEFAULT_HEADER_TIMEOUT",
    "DEFAULT_MAX_HEADER_SIZE",
    "DEFAULT_TIMEOUT",
    "ServerSettings",
    "group_id",
    "user_id",
]

DEFAULT_GRACEFUL_TIMEOUT = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_HEADER_TIMEOUT = 5.0
DEFAULT_MAX_HEADER_SIZE = 8192
# The smallest header limit that still holds any PROXY header without TLVs.
MIN_HEADER_SIZE = 256
MAX_HEADER_SIZE = 65536
_HEADER_NAME = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")


def _account_id(kind: str, value: str | int | None, by_name: Callable[[str], int]) -> int | None:
    """A numeric id as is, or the id of a name; errors naming the fix."""
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return value
    if not isinstance(value, str):
        raise TypeError(f"{kind} must be a name, a numeric id or None, not {value!r}")
    try:
        return by_name(value)
    except KeyError:
        raise ValueError(f"{kind} {value!r} does not exist on this machine; create it or name another") from None


def user_id(user: str | int | None) -> int | None:
    """The numeric id of a user name or id."""
    return _account_id("user", user, lambda name: pwd.getpwnam(name).pw_uid)


def group_id(group: str | int | None, user: int | None) -> int | None:
    """The numeric id of a group name or id; by default the primary group of ``user``."""
    if group is None and user is not None:
        try:
            return pwd.getpwuid(user).pw_gid
        except KeyError:
            return None  # a bare uid with no passwd entry: leave the group as it is
    return _account_id("group", group, lambda name: grp.getgrnam(name).gr_gid)


def _client_address_settings(
    proxy_protocol: bool,
    forwarded_header: str | None,
    trusted_proxies: Iterable[str] | None,
    header_timeout: float,
    max_header_size: int,
    fallback: bool = False,
) -> ClientAddressSettings | None:
    """Check the proxy options; None when neither is on."""
    if not isinstance(proxy_protocol, bool):
        raise TypeError(f"proxy_protocol must be True or False, not {proxy_protocol!r}")
    if forwarded_header is not None and (
        not isinstance(forwarded_header, str) or not _HEADER_NAME.fullmatch(forwarded_header)
    ):
        raise ValueError(
            f"forwarded_header must be an HTTP header name such as 'x-forwarded-for' or 'forwarded', "
            f"got {forwarded_header!r}"
        )
    if proxy_protocol and forwarded_header:
        raise ValueError(
            "use either proxy_protocol or forwarded_header, not both: a proxy that sends the PROXY protocol "
            "already tells the client address"
        )
    header_timeout = check_seconds("header_timeout", header_timeout, zero_allowed=False)
    if (
        isinstance(max_header_size, bool)
        or not isinstance(max_header_size, int)
        or not MIN_HEADER_SIZE <= max_header_size <= MAX_HEADER_SIZE
    ):
        raise ValueError(
            f"max_header_size must be from {MIN_HEADER_SIZE} to {MAX_HEADER_SIZE} bytes; got {max_header_size!r}"
        )
    if not (proxy_protocol or forwarded_header):
        if trusted_proxies is not None:
            raise ValueError(
                "trusted_proxies does nothing without proxy_protocol=True or forwarded_header=...; turn one on"
            )
        return None
    if isinstance(trusted_proxies, str):
        trusted_proxies = [trusted_proxies]
    trusted = TrustedProxies(DEFAULT_TRUSTED_PROXIES if trusted_proxies is None else trusted_proxies)
    return ClientAddressSettings(
        proxy_protocol,
        forwarded_header.lower() if forwarded_header else None,
        trusted,
        float(header_timeout),
        max_header_size,
        bool(fallback),
    )


@dataclasses.dataclass(frozen=True)
class ServerSettings:
    """A ``StickyServer``'s settings (the README's API table has one row per field), checked when made."""

    workers: int | None = None
    balancer: Balancer | str = "ip-hash"
    graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT
    timeout: float | None = DEFAULT_TIMEOUT
    max_connections_per_worker: int | None = None
    max_connections_jitter: int | None = None
    user: str | int | None = None
    group: str | int | None = None
    max_message_size: int = DEFAULT_MAX_MESSAGE_SIZE
    backlog: int = DEFAULT_BACKLOG
    proxy_protocol: bool = False
    forwarded_header: str | None = None
    trusted_proxies: Iterable[str] | None = None
    header_timeout: float = DEFAULT_HEADER_TIMEOUT
    max_header_size: int = DEFAULT_MAX_HEADER_SIZE
    steering: str = "auto"
    forwarded_header_fallback: bool = False
    unix_socket_mode: int = DEFAULT_UNIX_SOCKET_MODE
    route_by: str | RouteBy | None = None
    session_load_factor: float = DEFAULT_LOAD_FACTOR
    loop: str = "auto"
    # Resolved from the above when made.
    client_addresses: ClientAddressSettings | None = dataclasses.field(init=False, repr=False, compare=False)
    user_id: int | None = dataclasses.field(init=False, repr=False, compare=False)
    group_id: int | None = dataclasses.field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        resolved: dict[str, Any] = {}
        if self.steering not in STEERINGS:
            raise ValueError(f"steering must be one of {', '.join(map(repr, STEERINGS))}; got {self.steering!r}")
        workers = (os.cpu_count() or 1) if self.workers is None else self.workers
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number of processes, 1 or more; got {workers!r}")
        resolved["workers"] = workers
        resolved["graceful_timeout"] = check_seconds("graceful_timeout", self.graceful_timeout, zero_allowed=True)
        if self.timeout is not None:
            try:
                resolved["timeout"] = check_seconds("timeout", self.timeout, zero_allowed=False)
            except ValueError as exc:
                raise ValueError(f"{exc} (None: no heartbeat)") from None
        _check_optional_count("max_connections_per_worker", self.max_connections_per_worker, 1, "a positive int")
        _check_optional_count("max_connections_jitter", self.max_connections_jitter, 0, "an int, 0 or more")
        check_count("backlog", self.backlog, minimum=1, maximum=MAX_BACKLOG)
        size = self.max_message_size
        if isinstance(size, bool) or not isinstance(size, int) or not 1 <= size <= MAX_PAYLOAD - 2:
            raise ValueError(f"max_message_size must be from 1 to {MAX_PAYLOAD - 2} bytes; got {size!r}")
        mode = self.unix_socket_mode
        if isinstance(mode, bool) or not isinstance(mode, int) or not 0 <= mode <= 0o777:
            raise ValueError(f"unix_socket_mode must be a file mode from 0 to 0o777; got {mode!r}")
        if isinstance(self.trusted_proxies, str):
            resolved["trusted_proxies"] = (self.trusted_proxies,)
        elif self.trusted_proxies is not None:
            resolved["trusted_proxies"] = tuple(self.trusted_proxies)
        route = (
            self.route_by
            if isinstance(self.route_by, RouteBy) or self.route_by is None
            else RouteBy.parse(self.route_by)
        )
        addresses = _client_address_settings(
            self.proxy_protocol,
            self.forwarded_header,
            resolved.get("trusted_proxies"),
            self.header_timeout,
            self.max_header_size,
            self.forwarded_header_fallback,
        )
        balancer = balancer_from(self.balancer)
        if route is not None:
            balancer, addresses = _session_routing(route, self, balancer, addresses)
        resolved["route_by"] = route
        resolved["client_addresses"] = addresses
        resolved["balancer"] = balancer
        check_loop(self.loop, addresses is not None and addresses.names_clients)
        resolved["user_id"] = user_id(self.user)
        resolved["group_id"] = group_id(self.group, resolved["user_id"])
        for name, value in resolved.items():
            object.__setattr__(self, name, value)

    @property
    def tells_the_client(self) -> bool:
        """Whether handed-off sockets may tell a client a proxy named as their peer, not the kernel's
        (``worker.connections.ProxiedSocket``): behind ``proxy_protocol`` or a forwarded header."""
        return self.client_addresses is not None and self.client_addresses.names_clients

    @classmethod
    def names(cls) -> list[str]:
        """The settings a user gives (the fields ``__init__`` takes)."""
        return [field.name for field in dataclasses.fields(cls) if field.init]

    def given(self) -> dict[str, Any]:
        """The settings as given to ``__init__``, resolved (for ``StickyServer(**settings.given())``)."""
        return {name: getattr(self, name) for name in self.names()}


def _session_routing(
    route: RouteBy, settings: ServerSettings, balancer: Balancer, addresses: ClientAddressSettings | None
) -> tuple[SessionBalancer, ClientAddressSettings]:
    """With ``route_by``: the balancer that routes by session, and the intake that reads every first request."""
    if isinstance(balancer, SessionBalancer) and balancer.route == route:
        return balancer, _reading_sessions(route, settings, addresses)  # made from these settings already
    if type(balancer) is not IPHashBalancer:
        raise ValueError(
            f"route_by places sessions itself (by their key, new ones by IP hash with bounded loads); it cannot "
            f"use the balancer {balancer.name!r}: drop one of the two"
        )
    if settings.proxy_protocol:
        raise ValueError(
            "route_by reads each connection's first request, which the PROXY protocol header precedes; "
            "have the proxy send X-Forwarded-For instead (forwarded_header='x-forwarded-for')"
        )
    sessions = SessionBalancer(route, settings.session_load_factor, balancer.ipv4_prefix, balancer.ipv6_prefix)
    return sessions, _reading_sessions(route, settings, addresses)


def _reading_sessions(
    route: RouteBy, settings: ServerSettings, addresses: ClientAddressSettings | None
) -> ClientAddressSettings:
    """The intake's settings with routing by session: every peer's first request is read (bytes that are no
    request, or no head in time, route by the peer's address)."""
    if addresses is None:
        addresses = ClientAddressSettings(
            False, None, TrustedProxies([]), float(settings.header_timeout), settings.max_header_size
        )
    return dataclasses.replace(addresses, fallback=True, session=route)


def _check_optional_count(name: str, value: object, minimum: int, what: str) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < minimum):
        raise ValueError(f"{name} must be {what}, or None; got {value!r}")
