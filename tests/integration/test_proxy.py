"""The real client address from PROXY headers and forwarded headers, sent by hand from real sockets.

The clients here play the proxy: they connect from 127.0.0.1 (trusted by default)
and claim addresses from the documentation ranges. Hostile input (garbage, a
client that sends nothing, one that sends a byte at a time) must be closed within
the header timeout while other clients keep being served.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time

from .conftest import StartApp
from .harness import SIGNATURE, exchange, expected_slot, proxy_v1, proxy_v2, reply_of, request

CLAIMED = [f"203.0.113.{n}" for n in range(1, 13)] + [f"2001:db8::{n:x}" for n in range(1, 9)]


def test_proxy_protocol_v1_and_v2_route_by_the_address_in_the_header(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "4", "APP_PROXY": "1"})
    address = server.wait_listening()

    for build in (proxy_v1, proxy_v2):
        for claimed in CLAIMED:
            reply = reply_of(exchange(address, build(claimed, 41000) + b"first line\n"))
            # The worker's server read the application stream from its first byte...
            assert reply["line"] == "first line", (build.__name__, reply)
            # ...was routed by the claimed address, and can ask for it.
            assert reply["client"] == [claimed, 41000], (build.__name__, reply)
            assert reply["slot"] == expected_slot(claimed, 4), (build.__name__, claimed, reply)
            assert reply["peer"] == [claimed, 41000]  # the socket itself says so (connections.HandedOffSocket)
    slots = {expected_slot(claimed, 4) for claimed in CLAIMED}
    assert len(slots) > 1


def test_a_health_check_header_routes_by_the_proxy_itself(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1"})
    address = server.wait_listening()

    local_v2 = SIGNATURE + bytes([0x20, 0x00, 0, 0])
    for header in (b"PROXY UNKNOWN\r\n", local_v2):
        reply = reply_of(exchange(address, header + b"check\n"))
        assert reply["line"] == "check"
        assert reply["client"] == reply["peer"]


def test_untrusted_peers_are_routed_by_socket_address_and_their_header_left_alone(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "3", "APP_PROXY": "1", "APP_TRUSTED": "127.0.0.1"})
    address = server.wait_listening()

    for source in ("127.0.0.7", "127.0.0.8", "127.0.0.9"):
        reply = reply_of(exchange(address, proxy_v1("203.0.113.50") + b"after\n", source=source))
        assert reply["line"].startswith("PROXY TCP4 203.0.113.50"), reply  # the application got the header
        assert reply["client"][0] == source
        assert reply["slot"] == expected_slot(source, 3)
    # A plain client (no header at all) that is not a trusted proxy is served as usual.
    assert request(address, source="127.0.0.10", line="plain")["line"] == "plain"


def test_malformed_headers_are_closed_and_logged_and_others_keep_flowing(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1"})
    address = server.wait_listening()
    bad = [
        b"GET / HTTP/1.1\r\n\r\n",
        b"PROXY TCP4 999.1.1.1 127.0.0.1 1 2\r\nx\n",
        b"PROXY TCP4 1.2.3.4 127.0.0.1 1\r\nx\n",
        b"PROXY " + b"A" * 200 + b"\r\n",
        SIGNATURE + bytes([0x21, 0x11, 0xFF, 0xFF]) + b"x" * 100,  # v2 PROXY declaring 64 KiB: over the limit
        SIGNATURE + bytes([0x11, 0x11, 0, 12]) + bytes(12),  # version 1 in a v2 header
    ]
    for data in bad:
        # Closed without an answer (a FIN, or a reset if bytes were still arriving).
        try:
            answer = exchange(address, data)
        except ConnectionResetError:
            answer = b""
        assert answer == b"", (data, answer)
        assert reply_of(exchange(address, proxy_v1("198.51.100.1") + b"ok\n"))["line"] == "ok"
    server.wait_for(r"closed \d+ connection\(s\) from trusted proxies with a bad header")


def test_slow_and_silent_clients_get_a_bounded_wait_while_others_are_served(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1", "APP_HEADER_TIMEOUT": "1.5"})
    address = server.wait_listening()
    silent = socket.create_connection(address, timeout=15)
    slow = socket.create_connection(address, timeout=15)
    stop_dripping = threading.Event()
    header = proxy_v1("203.0.113.99")

    def drip() -> None:  # one byte every 0.2 s: the whole header would take over 8 s
        for byte in header:
            if stop_dripping.wait(0.2):
                return
            try:
                slow.send(bytes([byte]))
            except OSError:
                return

    dripper = threading.Thread(target=drip, daemon=True)
    dripper.start()
    try:
        began = time.monotonic()
        served = 0
        while time.monotonic() - began < 1.0:  # both hostile clients are waiting all this time
            reply = reply_of(exchange(address, proxy_v1("198.51.100.2") + b"busy\n", timeout=5))
            assert reply["line"] == "busy"
            served += 1
        assert served >= 5, f"only {served} clients served while two stalled ones waited"
        for sock in (silent, slow):
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(100) == b""  # the master closed it...
        elapsed = time.monotonic() - began
        assert elapsed < 10, f"closed after {elapsed:.1f} s; header_timeout is 1.5 s"  # ...within the bound
    finally:
        stop_dripping.set()
        dripper.join(5)
        silent.close()
        slow.close()
    server.wait_for(r"closed \d+ connection\(s\) that sent no complete header within 1\.5 s")


def test_a_header_in_many_pieces_arrives_whole(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1"})
    address = server.wait_listening()

    for build in (proxy_v1, proxy_v2):
        data = build("203.0.113.77", 5000) + b"pieces\n"
        with socket.create_connection(address, timeout=15) as sock:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            for start in range(0, len(data), 5):
                sock.sendall(data[start : start + 5])
                time.sleep(0.02)  # separate segments, so the master sees partial headers
            reply = reply_of(sock.makefile("rb").readline())
        assert reply["line"] == "pieces"
        assert reply["client"] == ["203.0.113.77", 5000]


def test_forwarded_headers_route_http_by_the_rightmost_untrusted_address(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "4", "APP_FORWARDED": "x-forwarded-for", "APP_MODE": "http"})
    address = server.wait_listening()

    for claimed in CLAIMED:
        head = f"GET /path HTTP/1.1\r\nHost: test\r\nX-Forwarded-For: 192.0.2.200, {claimed}, 127.0.0.3\r\n\r\n"
        reply = reply_of(exchange(address, head.encode()))
        # The master only peeked: the worker's server got the whole request.
        assert reply["line"] == "GET /path HTTP/1.1"
        assert f"X-Forwarded-For: 192.0.2.200, {claimed}, 127.0.0.3" in reply["headers"]
        assert reply["client"] == [claimed, 0]
        assert reply["slot"] == expected_slot(claimed, 4)
    # Without the header, a trusted peer is routed by its own address.
    reply = reply_of(exchange(address, b"GET / HTTP/1.1\r\nHost: test\r\n\r\n"))
    assert reply["client"] == reply["peer"]


def test_forwarded_rfc7239_and_an_oversized_head(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "3", "APP_FORWARDED": "forwarded", "APP_MODE": "http"})
    address = server.wait_listening()

    head = b'GET / HTTP/1.1\r\nForwarded: for="[2001:db8::17]:4711";proto=https, for=127.0.0.1\r\n\r\n'
    reply = reply_of(exchange(address, head))
    assert reply["client"] == ["2001:db8::17", 0]
    assert reply["slot"] == expected_slot("2001:db8::17", 3)

    huge = b"GET / HTTP/1.1\r\nCookie: " + b"c" * 20000 + b"\r\n\r\n"
    try:
        answer = exchange(address, huge)
    except ConnectionResetError:
        answer = b""
    assert answer == b""
    server.wait_for(r"no complete HTTP request head in the first 8192 bytes")
