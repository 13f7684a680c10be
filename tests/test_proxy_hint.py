"""The worker's hint about an undeclared proxy, on real loopback sockets."""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator

import pytest

from sticky_server.proxy import may_be_http
from sticky_server.worker.proxy_hint import SAMPLE, ProxyHint


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as server:
        yield server


def accepted(listener: socket.socket, data: bytes, clients: list[socket.socket]) -> socket.socket:
    client = socket.create_connection(listener.getsockname(), timeout=5)
    clients.append(client)
    if data:
        client.sendall(data)
    sock, _ = listener.accept()
    if data:
        sock.settimeout(5)
        assert sock.recv(len(data), socket.MSG_PEEK | socket.MSG_WAITALL) == data  # in the buffer
    return sock


def forwarded(client: str) -> bytes:
    return f"GET / HTTP/1.1\r\nHost: x\r\nX-Forwarded-For: {client}\r\n\r\n".encode()


def test_two_clients_named_by_one_local_proxy_are_said_once(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    hint = ProxyHint(slot=2)
    clients: list[socket.socket] = []
    try:
        first = accepted(listener, forwarded("203.0.113.7"), clients)
        assert hint.look(first) is False  # one client: maybe the only one
        again = accepted(listener, forwarded("203.0.113.7"), clients)
        assert hint.look(again) is False
        with caplog.at_level(logging.WARNING, "sticky_server"):
            other = accepted(listener, forwarded("198.51.100.9, 10.0.0.1"), clients)
            assert hint.look(other) is True  # done: the caller drops it
        (record,) = caplog.records
        assert "worker 2: requests from the proxy at 127.0.0.1 name different clients in X-Forwarded-For" in (
            record.getMessage()
        )
        assert "--proxy-headers" in record.getMessage()
        # Nothing was read: the application still gets the whole request.
        assert other.recv(4096) == forwarded("198.51.100.9, 10.0.0.1")
        for sock in (first, again, other):
            sock.close()
    finally:
        for client in clients:
            client.close()


def test_requests_without_forwarded_headers_and_empty_buffers_say_nothing(
    listener: socket.socket, caplog: pytest.LogCaptureFixture
) -> None:
    hint = ProxyHint(slot=0)
    clients: list[socket.socket] = []
    try:
        with caplog.at_level(logging.WARNING, "sticky_server"):
            for n in range(SAMPLE - 1):
                data = b"" if n % 2 else b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
                sock = accepted(listener, data, clients)
                assert hint.look(sock) is False
                sock.close()
            last = accepted(listener, b"", clients)
            assert hint.look(last) is True  # the sample is used up: it stops looking
            last.close()
        assert not caplog.records
    finally:
        for client in clients:
            client.close()


@pytest.mark.parametrize(
    ("data", "may"),
    [
        (b"", True),
        (b"G", True),
        (b"GET", True),
        (b"GET /", True),
        (b"OPTIONS * HTTP/1.1", True),
        (b"get / HTTP/1.1", False),
        (b"hello\n", False),
        (b"\x16\x03\x01", False),  # a TLS ClientHello
        (b"SSH-2.0-OpenSSH", False),
        (b"GET\t/", False),
        (b"A" * 21, False),
    ],
)
def test_may_be_http(data: bytes, may: bool) -> None:
    assert may_be_http(data) is may
