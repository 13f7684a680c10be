"""Binding: port validation and error messages that name the fix."""

from __future__ import annotations

import errno
import os
import socket
import stat
from pathlib import Path

import pytest
from pytest_mock import MockerFixture

from sticky_server import BindError
from sticky_server.listener import (
    DEFAULT_UNIX_SOCKET_MODE,
    OutOfDescriptors,
    accept_waiting,
    bind_listener,
    bind_unix_listener,
    format_address,
    validate_port,
)


@pytest.mark.parametrize(
    ("port", "error", "message"),
    [
        (True, TypeError, "port must be an int from 0 to 65535, not bool"),
        ("3000", TypeError, r"not str '3000' \(use int\('3000'\)\)"),
        (3000.0, TypeError, "not float"),
        (-1, ValueError, "got -1"),
        (65536, ValueError, r"from 0 to 65535 \(0 picks a free port\), got 65536"),
    ],
)
def test_bad_ports_are_refused_with_the_fix(port: object, error: type[Exception], message: str) -> None:
    with pytest.raises(error, match=message):
        validate_port(port)


def test_port_zero_picks_a_free_port() -> None:
    with bind_listener(0, "127.0.0.1") as listener:
        assert listener.getsockname()[1] > 0
        assert listener.getblocking() is False


def test_port_in_use() -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        expected = f"cannot listen on 127.0.0.1:{port}: the address is already in use"
        with pytest.raises(BindError, match=expected) as info:
            bind_listener(port, "127.0.0.1")
    assert info.value.errno == errno.EADDRINUSE


def test_permission_denied_names_the_fix(mocker: MockerFixture) -> None:
    mocker.patch("socket.create_server", side_effect=PermissionError(errno.EACCES, "Permission denied"))
    with pytest.raises(BindError, match=r"permission denied\. Ports below 1024 need root or CAP_NET_BIND_SERVICE"):
        bind_listener(80, "127.0.0.1")


def test_address_not_on_this_machine() -> None:
    with pytest.raises(BindError, match="no interface of this machine has that address"):
        bind_listener(0, "192.0.2.1")


def test_unresolvable_host(mocker: MockerFixture) -> None:
    mocker.patch("socket.getaddrinfo", side_effect=socket.gaierror(socket.EAI_NONAME, "Name or service not known"))
    with pytest.raises(BindError, match=r"'no-such-host\.invalid': the name does not resolve"):
        bind_listener(0, "no-such-host.invalid")


def test_host_must_be_text() -> None:
    with pytest.raises(TypeError, match="host must be a str"):
        bind_listener(0, 127001)  # type: ignore[arg-type]


def test_every_interface_listens_on_ipv6_and_ipv4() -> None:
    with bind_listener(0, None) as listener:
        if socket.has_dualstack_ipv6():
            assert listener.family == socket.AF_INET6
            assert listener.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        port = listener.getsockname()[1]
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass


def test_format_address() -> None:
    assert format_address(("127.0.0.1", 80)) == "127.0.0.1:80"
    assert format_address(("::", 80, 0, 0)) == "[::]:80"


def test_accept_waiting_takes_what_waits_and_stops_when_nothing_does() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        clients = [socket.create_connection(listener.getsockname()) for _ in range(3)]
        try:
            taken = list(accept_waiting(listener, 2))  # the limit
            taken += list(accept_waiting(listener, 64))  # the rest, then an empty queue ends it
            assert [address for _, address in taken] == [client.getsockname() for client in clients]
        finally:
            for fd, _ in taken:
                os.close(fd)
            for client in clients:
                client.close()


class _FailingListener:
    def __init__(self, *errors: int) -> None:
        self.errors = list(errors)

    def _accept(self) -> tuple[int, tuple[str, int]]:
        if self.errors:
            error = self.errors.pop(0)
            raise OSError(error, os.strerror(error))
        raise BlockingIOError


def test_accept_waiting_skips_aborted_connections_and_says_when_descriptors_run_out() -> None:
    assert list(accept_waiting(_FailingListener(errno.ECONNABORTED), 8)) == []  # type: ignore[arg-type]
    with pytest.raises(OutOfDescriptors) as caught:
        list(accept_waiting(_FailingListener(errno.EMFILE), 8))  # type: ignore[arg-type]
    assert caught.value.errno == errno.EMFILE
    with pytest.raises(OSError) as other:
        list(accept_waiting(_FailingListener(errno.EBADF), 8))  # type: ignore[arg-type]
    assert other.value.errno == errno.EBADF and not isinstance(other.value, OutOfDescriptors)


def test_a_unix_socket_lets_other_users_in_whatever_the_umask(tmp_path: Path) -> None:
    old = os.umask(0o077)
    try:
        for mode in (0o666, 0o660):
            path = tmp_path / f"app{mode:o}.sock"
            with bind_unix_listener(str(path), mode=mode):
                assert stat.S_IMODE(path.stat().st_mode) == mode
            # The socket file stays after the close, as after a crash: replaced, with the mode asked for.
            path.chmod(0o700)
            with bind_unix_listener(str(path), mode=mode):
                assert stat.S_IMODE(path.stat().st_mode) == mode
    finally:
        os.umask(old)


def test_the_command_takes_the_umask_off_the_socket_mode() -> None:
    from sticky_server.cli import parse_settings

    args = parse_settings(["m:app", "--uds", "/run/app.sock", "--umask", "007"], {})
    assert DEFAULT_UNIX_SOCKET_MODE & ~args.umask == 0o660
