"""The worker's record of open connections: closes are seen whatever closed them."""

from __future__ import annotations

import os
import socket

import pytest

from sticky_server.worker.connections import ConnectionRecord, HandedOffSocket, ProxiedSocket, unmapped


def test_the_sweep_counts_closed_and_reused_descriptors() -> None:
    record = ConnectionRecord()
    pairs = [socket.socketpair() for _ in range(4)]
    try:
        for ours, _ in pairs:
            record.add(ours.fileno(), None)
        assert record.sweep() == 0 and len(record) == 4
        pairs[0][0].close()
        # Closed, then the number reused by a new socket (the lowest free number): still a close.
        number = pairs[1][0].fileno()
        pairs[1][0].close()
        unrelated = socket.socket()
        replacement = socket.socket(fileno=os.dup2(unrelated.fileno(), number))
        unrelated.close()
        assert record.sweep() == 2 and len(record) == 2
        # A descriptor handed over again before any sweep counts its previous connection as closed.
        record.add(pairs[2][0].fileno(), None)
        assert record.sweep() == 1
        replacement.close()
    finally:
        for ours, theirs in pairs:
            ours.close()
            theirs.close()


def test_addresses_are_given_only_for_the_connection_they_came_with() -> None:
    record = ConnectionRecord()
    first, other = socket.socketpair()
    record.add(first.fileno(), ("203.0.113.4", 5000))
    assert record.address(first) == ("203.0.113.4", 5000)
    number = first.fileno()
    first.close()
    second = socket.socket()
    try:
        if second.fileno() == number:
            assert record.address(second) is None  # same number, another socket
    finally:
        second.close()
        other.close()


def test_a_handed_off_socket_reports_ipv4_clients_of_a_dual_stack_listener_unmapped() -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 here")
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as listener:
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port)) as client:
            accepted, _ = listener.accept()
            fd = accepted.detach()
            sock = HandedOffSocket(type=socket.SOCK_STREAM, fileno=fd)
            with sock:
                assert socket.socket.getpeername(sock)[0] == "::ffff:127.0.0.1"  # what the kernel says
                assert sock.getpeername() == client.getsockname()  # what a server on 0.0.0.0 would see
                assert sock.getsockname() == ("127.0.0.1", port)


def test_a_handed_off_socket_reports_the_client_a_proxy_named_and_keeps_it_across_dup() -> None:
    left, right = socket.socketpair()
    with left, right:
        sock = ProxiedSocket(left.family, socket.SOCK_STREAM, fileno=left.detach())
        sock.told_peer = ("203.0.113.9", 41000)
        with sock, sock.dup() as twin:
            assert sock.getpeername() == ("203.0.113.9", 41000)
            assert isinstance(twin, ProxiedSocket)
            assert twin.getpeername() == ("203.0.113.9", 41000)
        plain = HandedOffSocket(family=right.family, type=socket.SOCK_STREAM, fileno=right.detach())
        with plain:
            assert not hasattr(plain, "__dict__")  # nothing per connection beyond the socket itself
            with pytest.raises(AttributeError):
                plain.told_peer = ("203.0.113.9", 1)


def test_unmapped_leaves_other_addresses_alone() -> None:
    assert unmapped(("::ffff:10.1.2.3", 80, 0, 0)) == ("10.1.2.3", 80)
    assert unmapped(("::1", 80, 0, 0)) == ("::1", 80, 0, 0)
    assert unmapped(("::ffff:abcd", 80, 0, 0)) == ("::ffff:abcd", 80, 0, 0)
    assert unmapped(("10.1.2.3", 80)) == ("10.1.2.3", 80)
    assert unmapped("/run/app.sock") == "/run/app.sock"
