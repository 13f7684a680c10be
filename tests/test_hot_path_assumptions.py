"""What the hot path's shortcuts assume, pinned: if one of these fails, the shortcut beside it is wrong now.

- the master builds ``ClientInfo`` with ``tuple.__new__``, five fields (its NamedTuple ``__new__`` is Python code);
- ``wire.FrameReader`` builds ``Frame`` the same way;
- the master accepts with ``socket._accept()`` (a raw descriptor and address, no socket object);
- a kernel-path worker names family, type and protocol when it wraps what it accepted (no getsockopt):
  they are the listener's family, a stream, and TCP, as socket() would find them.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

import pytest

from sticky_server.balancer import ClientInfo
from sticky_server.protocol.frames import Frame, FrameKind


def test_client_info_is_the_five_field_tuple_the_master_builds() -> None:
    assert ClientInfo._fields == ("host", "port", "proxy", "local", "session")
    built = tuple.__new__(ClientInfo, ("10.0.0.1", 5000, None, ("0.0.0.0", 80), None))
    assert built == ClientInfo("10.0.0.1", 5000, None, ("0.0.0.0", 80))
    assert (built.host, built.port, built.proxy, built.local) == ("10.0.0.1", 5000, None, ("0.0.0.0", 80))
    assert built.session is None


def test_frame_is_the_three_field_tuple_the_reader_builds() -> None:
    assert Frame._fields == ("kind", "payload", "fds")
    built = tuple.__new__(Frame, (FrameKind.PING, b"", ()))
    assert built == Frame(FrameKind.PING, b"", ()) and built.kind is FrameKind.PING


def test_socket_accept_gives_a_raw_descriptor_and_the_address() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        fd, address = listener._accept()  # type: ignore[attr-defined]
        try:
            assert isinstance(fd, int) and address == client.getsockname()
        finally:
            socket.socket(fileno=fd).close()
            client.close()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the kernel path, where the worker relies on it")
@pytest.mark.parametrize("on_listener", [1, 0])
def test_an_accepted_socket_inherits_tcp_nodelay_from_its_listener(on_listener: int) -> None:
    # A kernel-path worker sets TCP_NODELAY once on its listener, not on every connection.
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, on_listener)
        with socket.create_connection(listener.getsockname()):
            conn, _ = listener.accept()
            with conn:
                assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == on_listener


@pytest.mark.parametrize("host", ["127.0.0.1", "::1"])
def test_an_accepted_connection_is_tcp_of_its_listener_s_family(host: str) -> None:
    from sticky_server.worker.connections import HandedOffSocket
    from sticky_server.worker.session import _INET_FAMILIES, _IPPROTO_TCP, _SOCK_STREAM

    if not socket.has_ipv6 and ":" in host:
        pytest.skip("no IPv6")
    with socket.create_server((host, 0), family=socket.AF_INET6 if ":" in host else socket.AF_INET) as listener:
        assert listener.proto == 0  # so the worker cannot take proto from the listener
        client = socket.create_connection(listener.getsockname()[:2])
        fd, _ = listener._accept()  # type: ignore[attr-defined]
        found = socket.socket(fileno=os.dup(fd))  # what socket() detects
        named = HandedOffSocket(int(listener.family), _SOCK_STREAM, _IPPROTO_TCP, fd)
        try:
            assert int(listener.family) in _INET_FAMILIES
            assert (named.family, named.type, named.proto) == (found.family, found.type, found.proto)
            assert named.proto == socket.IPPROTO_TCP
        finally:
            found.close()
            named.close()
            client.close()


@pytest.mark.parametrize(
    "make",
    [
        lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM),
        lambda: socket.socket(socket.AF_INET6, socket.SOCK_STREAM),
        lambda: socket.socket(socket.AF_UNIX, socket.SOCK_STREAM),
        lambda: socket.socket(socket.AF_INET, socket.SOCK_DGRAM),
    ],
    ids=["tcp4", "tcp6", "unix", "udp"],
)
def test_a_handed_off_socket_tells_family_and_type_as_socket_socket_does(make: Any) -> None:
    from sticky_server.worker.connections import HandedOffSocket

    with make() as plain:
        handed = HandedOffSocket(fileno=os.dup(plain.fileno()))
        with handed:
            for name in ("family", "type"):
                ours, theirs = getattr(handed, name), getattr(socket.socket, name).fget(handed)
                assert ours is theirs and type(ours) is type(theirs), name
