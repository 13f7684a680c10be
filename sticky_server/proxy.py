"""The real client address behind a proxy: PROXY protocol v1/v2 and forwarded headers.

Pure functions over bytes; the master's intake (``intake.py``) does the reading.

PROXY protocol (HAProxy's spec, versions 1 and 2): the proxy writes one header
before the client's bytes. ``parse_proxy_header`` says how long it is and which
address it carries, so the master can consume exactly those bytes.

Forwarded headers (HTTP): ``X-Forwarded-For: client, proxy1, proxy2`` or RFC 7239
``Forwarded: for=client, for=proxy1``. Each proxy appends the address it got the
request from, so only the entries a trusted proxy appended can be believed: the
client is the rightmost entry that is not itself a trusted proxy (what nginx's
``real_ip_recursive on`` and uvicorn's proxy-headers middleware do).
"""

from __future__ import annotations

import ipaddress
import re
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

if TYPE_CHECKING:
    from .sessions import RouteBy

__all__ = [
    "DEFAULT_TRUSTED_PROXIES",
    "MAX_V1_HEADER",
    "PROXY_V1_PREFIX",
    "PROXY_V2_SIGNATURE",
    "ClientAddressSettings",
    "ForwardedHeaderError",
    "ProxyHeader",
    "ProxyHeaderError",
    "TrustedProxies",
    "canonical_ip",
    "client_from_forwarded",
    "forwarded_addresses",
    "may_be_http",
    "parse_proxy_header",
    "request_head_length",
]

PROXY_V1_PREFIX = b"PROXY "
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
# The spec's bound for a v1 line, CRLF included.
MAX_V1_HEADER = 107
_V2_FIXED = struct.Struct(">12sBBH")
# v2 families: the size of their address block; for IP families, the socket family and address size.
_V2_ADDRESS_SIZES = {0x0: 0, 0x1: 12, 0x2: 36, 0x3: 216}
_V2_INET = {0x1: (socket.AF_INET, 4), 0x2: (socket.AF_INET6, 16)}
DEFAULT_TRUSTED_PROXIES = ("127.0.0.0/8", "::1")
_HEAD_END = b"\r\n\r\n"
# The longest text of an IP address without a zone ("ffff:ffff:ffff:ffff:ffff:ffff:255.255.255.255").
MAX_IP_TEXT = 45


class ProxyHeaderError(ValueError):
    """The bytes are not a valid PROXY protocol header."""


class ForwardedHeaderError(ValueError):
    """The bytes are not an HTTP request head."""


class ProxyHeader(NamedTuple):
    """A parsed PROXY protocol header."""

    length: int
    """How many bytes the header takes; the application's stream starts after them."""
    source: tuple[str, int] | None
    """The client's (address, port); None for a health check (v2 LOCAL, v1 UNKNOWN) or a non-IP family."""
    destination: tuple[str, int] | None
    """The address the client connected to, at the proxy; None when source is None."""


def _is_prefix(data: bytes, whole: bytes) -> bool:
    return whole.startswith(data[: len(whole)]) and len(data) < len(whole)


def parse_proxy_header(data: bytes, max_size: int = 4096) -> ProxyHeader | int:
    """Parse the PROXY header at the start of ``data``.

    Returns the header when ``data`` holds all of it, or else the number of bytes
    ``data`` must have at least before another try. Raises ProxyHeaderError when
    the bytes cannot start a valid header, or the header is over ``max_size``.
    """
    if data.startswith(PROXY_V2_SIGNATURE):
        return _parse_v2(data, max_size)
    if data.startswith(PROXY_V1_PREFIX):
        return _parse_v1(data)
    if _is_prefix(data, PROXY_V2_SIGNATURE):
        return len(PROXY_V2_SIGNATURE) + 4
    if _is_prefix(data, PROXY_V1_PREFIX):
        return len(PROXY_V1_PREFIX) + 1
    raise ProxyHeaderError(f"not a PROXY protocol header (starts with {bytes(data[:16])!r})")


def _parse_v1(data: bytes) -> ProxyHeader | int:
    end = data.find(b"\r\n", 0, MAX_V1_HEADER)
    if end < 0:
        if len(data) >= MAX_V1_HEADER:
            raise ProxyHeaderError(f"PROXY v1 line without CRLF in its first {MAX_V1_HEADER} bytes")
        if b"\n" in data:
            raise ProxyHeaderError("PROXY v1 line ends with LF, not CRLF")
        return len(data) + 1
    fields = data[:end].split(b" ")
    protocol = fields[1] if len(fields) > 1 else b""
    if protocol == b"UNKNOWN":
        return ProxyHeader(end + 2, None, None)
    if protocol not in (b"TCP4", b"TCP6") or len(fields) != 6:
        raise ProxyHeaderError(f"malformed PROXY v1 line {bytes(data[:end])!r}")
    family = socket.AF_INET if protocol == b"TCP4" else socket.AF_INET6
    source = (_v1_address(fields[2], family), _v1_port(fields[4]))
    destination = (_v1_address(fields[3], family), _v1_port(fields[5]))
    return ProxyHeader(end + 2, source, destination)


def _v1_address(field: bytes, family: int) -> str:
    try:
        text = field.decode("ascii")
        return socket.inet_ntop(family, socket.inet_pton(family, text))
    except (UnicodeDecodeError, OSError, ValueError):
        kind = "IPv4" if family == socket.AF_INET else "IPv6"
        raise ProxyHeaderError(f"PROXY v1 address {bytes(field)!r} is not an {kind} address") from None


def _v1_port(field: bytes) -> int:
    if not (field.isdigit() and 0 < len(field) <= 5 and int(field) <= 65535):
        raise ProxyHeaderError(f"PROXY v1 port {bytes(field)!r} is not a number from 0 to 65535")
    return int(field)


def _parse_v2(data: bytes, max_size: int) -> ProxyHeader | int:
    if len(data) < _V2_FIXED.size:
        return _V2_FIXED.size
    version_command: int
    family_protocol: int
    length: int
    _, version_command, family_protocol, length = _V2_FIXED.unpack_from(data)
    version, command = version_command >> 4, version_command & 0xF
    if version != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version}")
    if command > 1:
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command}")
    family, protocol = family_protocol >> 4, family_protocol & 0xF
    if family not in _V2_ADDRESS_SIZES or protocol > 2:
        raise ProxyHeaderError(f"PROXY v2 header with unknown address family/protocol 0x{family_protocol:02x}")
    total = _V2_FIXED.size + length
    if total > max_size:
        raise ProxyHeaderError(f"PROXY v2 header of {total} bytes is over the {max_size} byte limit")
    if length < _V2_ADDRESS_SIZES[family]:
        raise ProxyHeaderError(f"PROXY v2 address block of {length} bytes is too short for family {family}")
    if len(data) < total:
        return total
    if command == 0 or family not in _V2_INET:  # LOCAL (a health check), or no IP address to tell
        return ProxyHeader(total, None, None)
    address_family, size = _V2_INET[family]
    start = _V2_FIXED.size
    source_ip = socket.inet_ntop(address_family, bytes(data[start : start + size]))
    destination_ip = socket.inet_ntop(address_family, bytes(data[start + size : start + 2 * size]))
    source_port, destination_port = struct.unpack_from(">HH", data, start + 2 * size)
    return ProxyHeader(total, (source_ip, source_port), (destination_ip, destination_port))


_METHOD = re.compile(rb"[A-Z]{1,20}")


def may_be_http(data: bytes) -> bool:
    """False once ``data`` cannot be the start of an HTTP request (its first bytes are no method token)."""
    method = _METHOD.match(data)
    if method is None:
        return not data
    end = method.end()
    return end == len(data) or data[end : end + 1] == b" "


def request_head_length(data: bytes, max_size: int) -> int | None:
    """The length of the HTTP request head at the start of ``data`` (through the blank line), or None if incomplete.

    Raises ForwardedHeaderError when ``max_size`` bytes hold no complete head, or
    the first line is not an HTTP request line.
    """
    end = data.find(_HEAD_END, 0, max_size)
    line_end = data.find(b"\r\n", 0, max_size)
    if line_end >= 0 and b" HTTP/" not in data[:line_end]:
        raise ForwardedHeaderError(f"not an HTTP request (first line {bytes(data[: min(line_end, 80)])!r})")
    if end >= 0:
        return end + len(_HEAD_END)
    if len(data) >= max_size:
        raise ForwardedHeaderError(f"no complete HTTP request head in the first {max_size} bytes")
    return None


def _strip_port(value: str) -> str:
    """The address of 'a.b.c.d', 'a.b.c.d:port', '[v6]', '[v6]:port' or a bare IPv6 address."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    if value.count(":") == 1:
        return value.partition(":")[0]
    return value


def forwarded_addresses(head: bytes, header: str) -> list[str]:
    """Every address in the ``header`` lines of an HTTP request head, in order (leftmost first).

    ``header`` is ``"forwarded"`` (RFC 7239: the ``for=`` parameters) or any
    comma-separated list header such as ``"x-forwarded-for"``. Entries are given as
    sent, without port or brackets; they may be no IP address at all.
    """
    wanted = header.lower().encode("latin-1")
    values: list[str] = []
    for line in head.split(b"\r\n")[1:]:
        name, colon, raw = line.partition(b":")
        if colon and name.strip().lower() == wanted:
            values.extend(item.strip() for item in raw.decode("latin-1").split(","))
    if wanted != b"forwarded":
        return [_strip_port(value) for value in values if value]
    addresses = []
    for element in values:
        for pair in element.split(";"):
            key, equals, value = pair.strip().partition("=")
            if equals and key.strip().lower() == "for":
                addresses.append(_strip_port(value.strip().strip('"')))
    return addresses


class TrustedProxies:
    """The networks whose PROXY or forwarded headers are believed. ``"*"`` trusts every peer."""

    def __init__(self, networks: Iterable[str | ipaddress.IPv4Network | ipaddress.IPv6Network]) -> None:
        self.everyone = False
        self._networks: list[ipaddress.IPv4Network | ipaddress.IPv6Network] = []
        for network in networks:
            if network == "*":
                self.everyone = True
                continue
            try:
                self._networks.append(ipaddress.ip_network(network, strict=False))
            except (TypeError, ValueError):
                raise ValueError(
                    f"trusted proxy {network!r} is not an IP address or network (e.g. '10.0.0.0/8', '::1', '*')"
                ) from None
        self._cache: dict[str, bool] = {}

    @property
    def names(self) -> list[str]:
        """The trusted networks as strings (``["*"]`` when everyone is), for a framework's own allow-list."""
        return ["*"] if self.everyone else [str(network) for network in self._networks]

    def __contains__(self, host: object) -> bool:
        if self.everyone:
            return True
        if not isinstance(host, str):
            return False
        known = self._cache.get(host)
        if known is None:
            known = self._lookup(host)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[host] = known
        return known

    def _lookup(self, host: str) -> bool:
        if host == "":
            # A Unix-socket peer is a process of this machine, as a loopback one is: trusted alike.
            return self._lookup("127.0.0.1")
        try:
            address = ipaddress.ip_address(host.partition("%")[0])
        except ValueError:
            return False
        if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
            address = address.ipv4_mapped
        return any(address in network for network in self._networks)

    def __repr__(self) -> str:
        names = [str(network) for network in self._networks] + (["*"] if self.everyone else [])
        return f"TrustedProxies({names!r})"


def canonical_ip(text: str) -> str | None:
    """``text`` as an IP address in its canonical form, or None when it is none.

    An address with a zone id (``fe80::1%eth0``) is refused: a zone means nothing
    on this machine, and its free-form text must never reach a worker.
    """
    if "%" in text or len(text) > MAX_IP_TEXT:
        return None
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return None


def client_from_forwarded(addresses: Sequence[str], trusted: TrustedProxies) -> str | None:
    """The client address in a forwarded list: the rightmost entry that is not a trusted proxy.

    Every entry is checked to be an IP address before it is believed or passed on,
    and the address comes back in canonical form. None when the entry that decides
    is not an IP address (``unknown``, an obfuscated name, garbage) or the list is
    empty: the caller falls back to the socket's peer. When every entry is a trusted
    proxy, the leftmost is the client.
    """
    client = None
    for address in reversed(addresses):
        client = canonical_ip(address)
        if client is None or client not in trusted:
            return client
    return client


@dataclass(frozen=True)
class ClientAddressSettings:
    """How the master learns client addresses from proxies (see ``StickyServer``)."""

    proxy_protocol: bool
    forwarded_header: str | None
    trusted: TrustedProxies
    timeout: float
    max_size: int
    # A trusted peer that sends no HTTP request (other bytes, or nothing in time) is routed by its
    # own address instead of closed: the CLI's Unix sockets, where a proxy and local clients mix.
    fallback: bool = False
    # Routing by session (``sessions``): the key the first request of every connection carries, from
    # any peer; a connection with no request head in time is routed by its address (fallback).
    session: RouteBy | None = None

    @property
    def names_clients(self) -> bool:
        """Whether a proxy's header may name the client (not so when only sessions are read)."""
        return self.proxy_protocol or self.forwarded_header is not None
