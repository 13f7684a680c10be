"""PROXY protocol and forwarded-header parsing: the spec's examples, every prefix, and fuzzing."""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sticky_server.proxy import (
    PROXY_V2_SIGNATURE,
    ForwardedHeaderError,
    ProxyHeader,
    ProxyHeaderError,
    TrustedProxies,
    client_from_forwarded,
    forwarded_addresses,
    parse_proxy_header,
    request_head_length,
)


def v2(command: int, family: int, block: bytes) -> bytes:
    return PROXY_V2_SIGNATURE + bytes([0x20 | command, family]) + struct.pack(">H", len(block)) + block


def v2_inet(source: str, source_port: int, destination: str, destination_port: int, tlvs: bytes = b"") -> bytes:
    if ":" in source:
        family, packed = (
            0x21,
            socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, destination),
        )
    else:
        family, packed = 0x11, socket.inet_aton(source) + socket.inet_aton(destination)
    return v2(1, family, packed + struct.pack(">HH", source_port, destination_port) + tlvs)


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        (
            b"PROXY TCP4 192.0.2.1 198.51.100.1 56324 443\r\nGET /",
            ProxyHeader(45, ("192.0.2.1", 56324), ("198.51.100.1", 443)),
        ),
        (b"PROXY TCP6 2001:db8::1 ::1 1 65535\r\n", ProxyHeader(36, ("2001:db8::1", 1), ("::1", 65535))),
        (b"PROXY UNKNOWN\r\n", ProxyHeader(15, None, None)),
        (b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\nx", ProxyHeader(59, None, None)),
        (v2_inet("192.0.2.7", 1234, "10.0.0.1", 80) + b"app", ProxyHeader(28, ("192.0.2.7", 1234), ("10.0.0.1", 80))),
        (v2_inet("2001:db8::7", 1, "::1", 2), ProxyHeader(52, ("2001:db8::7", 1), ("::1", 2))),
        # TLVs after the addresses are skipped with the header.
        (
            v2_inet("192.0.2.8", 5, "10.0.0.1", 6, b"\x04\x00\x03abc"),
            ProxyHeader(34, ("192.0.2.8", 5), ("10.0.0.1", 6)),
        ),
        (v2(0, 0x00, b""), ProxyHeader(16, None, None)),  # LOCAL: a health check
        (v2(1, 0x31, bytes(216)), ProxyHeader(232, None, None)),  # AF_UNIX: no IP to tell
    ],
)
def test_valid_headers(data: bytes, expected: ProxyHeader) -> None:
    assert parse_proxy_header(data) == expected


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"GET / HTTP/1.1\r\n", "not a PROXY protocol header"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 3\r\n", "malformed PROXY v1 line"),
        (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "malformed PROXY v1 line"),
        (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "is not an IPv4 address"),
        (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "is not an IPv6 address"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "is not a number from 0 to 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "is not a number from 0 to 65535"),
        (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "ends with LF, not CRLF"),
        (b"PROXY " + b"x" * 120, "without CRLF in its first 107 bytes"),
        (PROXY_V2_SIGNATURE + b"\x10\x11\x00\x0c" + bytes(12), "version 1"),
        (PROXY_V2_SIGNATURE + b"\x22\x11\x00\x0c" + bytes(12), "unknown command 2"),
        (PROXY_V2_SIGNATURE + b"\x21\x41\x00\x0c" + bytes(12), "unknown address family"),
        (PROXY_V2_SIGNATURE + b"\x21\x11\x00\x04" + bytes(4), "too short"),
        (PROXY_V2_SIGNATURE + b"\x21\x11\xff\xff", "over the 4096 byte limit"),
    ],
)
def test_invalid_headers_say_what_is_wrong(data: bytes, message: str) -> None:
    with pytest.raises(ProxyHeaderError, match=message):
        parse_proxy_header(data)


ADDRESSES_V4 = st.ip_addresses(v=4).map(str)
ADDRESSES_V6 = st.ip_addresses(v=6).map(str)
PORTS = st.integers(0, 65535)


@st.composite
def valid_headers(draw: st.DrawFn) -> tuple[bytes, tuple[str, int]]:
    v6 = draw(st.booleans())
    addresses = ADDRESSES_V6 if v6 else ADDRESSES_V4
    source, destination = draw(addresses), draw(addresses)
    source_port, destination_port = draw(PORTS), draw(PORTS)
    if draw(st.booleans()):
        family = "TCP6" if v6 else "TCP4"
        data = f"PROXY {family} {source} {destination} {source_port} {destination_port}\r\n".encode()
    else:
        data = v2_inet(source, source_port, destination, destination_port, draw(st.binary(max_size=64)))
    return data, (source, source_port)


@given(valid_headers(), st.binary(max_size=32))
@settings(max_examples=300, deadline=None)
def test_every_valid_header_parses_and_every_prefix_asks_for_more(
    header: tuple[bytes, tuple[str, int]], rest: bytes
) -> None:
    data, source = header
    parsed = parse_proxy_header(data + rest)
    assert isinstance(parsed, ProxyHeader)
    assert parsed.length == len(data)
    assert parsed.source is not None
    assert ipaddress.ip_address(parsed.source[0]) == ipaddress.ip_address(source[0])
    assert parsed.source[1] == source[1]
    for end in range(len(data)):
        needed = parse_proxy_header(data[:end])
        assert isinstance(needed, int) and end < needed <= len(data), (end, needed)


def check_proxy_parser_on(data: bytes) -> None:
    """Only a ProxyHeaderError, a header no longer than the data, or a need for more than it has."""
    try:
        result = parse_proxy_header(data)
    except ProxyHeaderError:
        return
    if isinstance(result, ProxyHeader):
        assert 0 < result.length <= len(data)
    else:
        assert result > len(data)


@given(st.binary(max_size=300))
@settings(max_examples=2000, deadline=None)
def test_arbitrary_bytes_never_break_the_proxy_parser(data: bytes) -> None:
    check_proxy_parser_on(data)


@given(st.binary(max_size=300).map(lambda tail: PROXY_V2_SIGNATURE + tail))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_v2_bodies_never_break_the_parser(data: bytes) -> None:
    check_proxy_parser_on(data)


@given(st.binary(max_size=120).map(lambda tail: b"PROXY " + tail))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_v1_lines_never_break_the_parser(data: bytes) -> None:
    check_proxy_parser_on(data)


def test_request_head_length() -> None:
    head = b"GET / HTTP/1.1\r\nHost: a\r\n\r\n"
    assert request_head_length(head + b"body", 8192) == len(head)
    assert request_head_length(head[:-2], 8192) is None
    assert request_head_length(b"GET / HT", 8192) is None
    with pytest.raises(ForwardedHeaderError, match="not an HTTP request"):
        request_head_length(b"\x16\x03\x01\x02\x00\r\n", 8192)
    with pytest.raises(ForwardedHeaderError, match="no complete HTTP request head in the first 64 bytes"):
        request_head_length(b"GET / HTTP/1.1\r\n" + b"X: y\r\n" * 20, 64)


@given(st.binary(max_size=400))
@settings(max_examples=1000, deadline=None)
def test_arbitrary_bytes_never_break_the_forwarded_parsers(data: bytes) -> None:
    with contextlib.suppress(ForwardedHeaderError):
        request_head_length(data, 256)
    trusted = TrustedProxies(["127.0.0.0/8"])
    for header in ("x-forwarded-for", "forwarded"):
        addresses = forwarded_addresses(data, header)
        client = client_from_forwarded(addresses, trusted)
        assert client is None or client in addresses


def test_forwarded_addresses() -> None:
    head = (
        b"GET / HTTP/1.1\r\nX-Forwarded-For: 192.0.2.1, [2001:db8::1]:443\r\n"
        b'x-forwarded-for: 10.0.0.1:8080\r\nForwarded: for=192.0.2.43, for="[2001:db8:cafe::17]:4711";proto=https\r\n'
        b"Forwarded: For=unknown;by=_hidden\r\n\r\n"
    )
    assert forwarded_addresses(head, "x-forwarded-for") == ["192.0.2.1", "2001:db8::1", "10.0.0.1"]
    assert forwarded_addresses(head, "forwarded") == ["192.0.2.43", "2001:db8:cafe::17", "unknown"]
    assert forwarded_addresses(head, "x-real-ip") == []


def test_the_client_is_the_rightmost_untrusted_entry() -> None:
    trusted = TrustedProxies(["10.0.0.0/8", "::1"])
    assert client_from_forwarded(["203.0.113.1", "198.51.100.2", "10.0.0.5"], trusted) == "198.51.100.2"
    assert client_from_forwarded(["203.0.113.1", "10.0.0.9", "10.0.0.5"], trusted) == "203.0.113.1"
    assert client_from_forwarded(["10.0.0.9", "10.0.0.5"], trusted) == "10.0.0.9"  # all proxies: the leftmost
    assert client_from_forwarded(["203.0.113.1", "unknown", "10.0.0.5"], trusted) is None  # spoofable garbage
    assert client_from_forwarded(["fe80::1%eth0"], trusted) is None
    assert client_from_forwarded([], trusted) is None


def test_trusted_proxies() -> None:
    trusted = TrustedProxies(["127.0.0.0/8", "::1", "2001:db8::/32"])
    assert "127.4.5.6" in trusted and "::1" in trusted and "2001:db8:1::9" in trusted
    assert "::ffff:127.0.0.1" in trusted  # an IPv4 peer on a dual-stack socket
    assert "10.0.0.1" not in trusted and "2001:db9::1" not in trusted
    # A Unix-socket peer (no address) is local: trusted exactly when loopback is.
    assert "" in trusted and "" not in TrustedProxies(["10.0.0.0/8", "::1"])
    assert "anything" in TrustedProxies(["*"])
    with pytest.raises(ValueError, match="trusted proxy 'localhost' is not an IP address or network"):
        TrustedProxies(["localhost"])
