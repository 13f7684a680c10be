"""The master's header reading, in-process with real loopback sockets and a real selector."""

from __future__ import annotations

import os
import select
import selectors
import socket
import time
from collections.abc import Iterator

import pytest
from pytest_mock import MockerFixture

from sticky_server.balancer import ClientInfo
from sticky_server.master.intake import Intake
from sticky_server.proxy import ClientAddressSettings, TrustedProxies

Routed = list[tuple[int, int, ClientInfo]]


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as sock:
        yield sock


def settings(timeout: float = 5.0, forwarded: str | None = None) -> ClientAddressSettings:
    return ClientAddressSettings(forwarded is None, forwarded, TrustedProxies(["127.0.0.1"]), timeout, 8192)


Faults = list[tuple[int, ClientInfo, BaseException]]


def make_intake(intake_settings: ClientAddressSettings) -> tuple[selectors.BaseSelector, Intake, Routed, Faults]:
    """An intake on a fresh selector that records what it routes and what it closes for a fault."""
    selector = selectors.DefaultSelector()
    routed: Routed = []
    faults: Faults = []
    intake = Intake(selector, intake_settings, lambda *args: routed.append(args), lambda *args: faults.append(args))
    return selector, intake, routed, faults


def take_one(intake: Intake, listener: socket.socket, conn_id: int = 1, arrived: int = 0) -> None:
    """Accept one connection and give it to the intake once ``arrived`` bytes of it wait to be read."""
    fd, address = listener._accept()  # type: ignore[attr-defined]
    wait_for_bytes(fd, arrived)
    intake.take(conn_id, fd, listener.family, ClientInfo(address[0], address[1]))


def wait_for_bytes(fd: int, count: int, timeout: float = 5.0) -> None:
    """Until ``count`` bytes wait on ``fd``: the test's point of synchronisation (peeked; its mode untouched)."""
    sock = socket.socket(fileno=fd)
    try:
        deadline = time.monotonic() + timeout
        while count and len(peek(sock, count)) < count:
            assert time.monotonic() < deadline, f"{count} bytes did not arrive in {timeout} s"
            select.select([fd], [], [], 0.01)
    finally:
        sock.detach()


def peek(sock: socket.socket, count: int) -> bytes:
    try:
        return sock.recv(count, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return b""


def run(selector: selectors.BaseSelector, intake: Intake, seconds: float) -> int:
    """Run the selector like the master does for ``seconds``; return how many callbacks ran."""
    calls = 0
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        for key, mask in selector.select(min(left, 0.05)):
            key.data(mask)
            calls += 1
        intake.expire(time.monotonic())
    return calls


def test_a_partial_header_does_not_spin_the_loop(listener: socket.socket) -> None:
    selector, intake, routed, _faults = make_intake(settings())
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(b"PROXY TCP4 203.0.113.5 ")
        take_one(intake, listener, arrived=len(b"PROXY TCP4 203.0.113.5 "))
        assert intake.waiting == 1
        # Level-triggered readiness on peeked-but-unread bytes would fire thousands of
        # times here; SO_RCVLOWAT holds it back until the rest arrives.
        assert run(selector, intake, 0.5) <= 1
        client.sendall(b"127.0.0.1 1000 80\r\nhello")
        assert run(selector, intake, 0.3) >= 1
        assert intake.waiting == 0
        ((_conn_id, fd, client_info),) = routed
        with socket.socket(fileno=fd) as handed:
            # Exactly the header was consumed; the low-water mark is back to 1.
            assert handed.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT) == 1
            assert handed.recv(100) == b"hello"
    assert client_info.host == "203.0.113.5" and client_info.port == 1000
    assert client_info.proxy is not None and client_info.proxy[0] == "127.0.0.1"
    selector.close()


def test_a_complete_header_is_routed_without_waiting(listener: socket.socket) -> None:
    selector, intake, routed, _faults = make_intake(settings(forwarded="x-forwarded-for"))
    request = b"GET / HTTP/1.1\r\nX-Forwarded-For: 198.51.100.3\r\n\r\n"
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(request)
        take_one(intake, listener, arrived=len(request))
        assert intake.waiting == 0 and len(routed) == 1  # routed at once, no selector round
        with socket.socket(fileno=routed[0][1]) as handed:
            assert handed.recv(1000) == request  # nothing consumed
    assert routed[0][2].host == "198.51.100.3"
    selector.close()


def test_a_silent_client_is_closed_at_the_deadline_and_an_early_eof_at_once(listener: socket.socket) -> None:
    selector, intake, routed, _faults = make_intake(settings(timeout=0.3))
    with socket.create_connection(listener.getsockname()) as silent:
        take_one(intake, listener)
        assert intake.next_deadline() is not None
        run(selector, intake, 0.6)
        assert intake.waiting == 0 and not routed
        silent.settimeout(5)
        assert silent.recv(10) == b""
    with socket.create_connection(listener.getsockname()) as leaving:
        leaving.sendall(b"PROXY TCP4")
        take_one(intake, listener)
        leaving.shutdown(socket.SHUT_WR)
        run(selector, intake, 0.1)
        assert intake.waiting == 0 and not routed
    selector.close()


def test_untrusted_peers_are_routed_at_once_and_nothing_is_read(listener: socket.socket) -> None:
    only_other = ClientAddressSettings(True, None, TrustedProxies(["10.0.0.1"]), 5.0, 8192)
    selector, intake, routed, _faults = make_intake(only_other)
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n")
        take_one(intake, listener)
        assert len(routed) == 1 and routed[0][2].proxy is None
        with socket.socket(fileno=routed[0][1]) as handed:
            handed.settimeout(5)
            assert handed.recv(100).startswith(b"PROXY TCP4 1.2.3.4")
    selector.close()


def test_a_default_socket_timeout_neither_blocks_the_master_nor_reaches_the_worker(listener: socket.socket) -> None:
    selector, intake, routed, _faults = make_intake(settings())
    previous = socket.getdefaulttimeout()
    socket.setdefaulttimeout(3.0)
    try:
        with socket.create_connection(listener.getsockname()) as client:
            client.sendall(b"PROXY TCP4 203.0.113.5 ")
            fd, address = listener._accept()  # type: ignore[attr-defined]
            wait_for_bytes(fd, len(b"PROXY TCP4 203.0.113.5 "))
            started = time.monotonic()
            intake.take(
                1, fd, listener.family, ClientInfo(address[0], address[1])
            )  # an incomplete header: the peek must not wait for the rest
            assert time.monotonic() - started < 1.0 and intake.waiting == 1
            client.sendall(b"127.0.0.1 1000 80\r\nhello")
            run(selector, intake, 0.3)
        assert len(routed) == 1
        assert os.get_blocking(routed[0][1])  # the worker's server gets an ordinary blocking socket
        os.close(routed[0][1])
    finally:
        socket.setdefaulttimeout(previous)
        selector.close()


def test_readable_with_nothing_new_is_not_taken_for_end_of_stream(listener: socket.socket) -> None:
    selector, intake, routed, _faults = make_intake(settings())
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(b"PROXY TCP4 203.0.113.5 ")
        take_one(intake, listener, arrived=len(b"PROXY TCP4 203.0.113.5 "))
        assert intake.waiting == 1
        # What Linux does to a socket that runs low on receive memory (a header in many
        # tiny segments): report it readable below its low-water mark, with nothing new.
        (fd,) = [key.fd for key in selector.get_map().values()]
        selector.get_key(fd).data(selectors.EVENT_READ)
        assert intake.waiting == 1 and not routed  # kept: no FIN came
        assert intake.next_deadline() is not None
        client.sendall(b"127.0.0.1 1000 80\r\nhello")
        run(selector, intake, 0.3)  # peeked again on the poll interval
        assert len(routed) == 1 and routed[0][2].host == "203.0.113.5"
        os.close(routed[0][1])
    selector.close()


def test_an_error_while_parsing_closes_that_connection_only(listener: socket.socket, mocker: MockerFixture) -> None:
    selector, intake, routed, faults = make_intake(settings())
    mocker.patch.object(intake, "_parse", side_effect=RuntimeError("a bug in a parser"))
    with socket.create_connection(listener.getsockname()) as client:
        client.sendall(b"PROXY TCP4 203.0.113.5 127.0.0.1 1000 80\r\n")
        take_one(intake, listener, arrived=len(b"PROXY TCP4 203.0.113.5 127.0.0.1 1000 80\r\n"))
        assert intake.waiting == 0 and not selector.get_map() and not routed
        ((fd, client_info, error),) = faults
        assert isinstance(error, RuntimeError) and client_info.host == "127.0.0.1"
        os.close(fd)
    selector.close()
