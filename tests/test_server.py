"""The facade: arguments, master/worker identity, and calls made in the wrong process."""

from __future__ import annotations

import os
import socket
import sys
import threading
from collections.abc import Iterator

import pytest

from sticky_server import (
    IPHashBalancer,
    RoundRobinBalancer,
    StickyServer,
    WrongProcessError,
    current_server,
)
from sticky_server.protocol.environment import CONTROL_FD_ENV, WORKER_SLOT_ENV
from sticky_server.worker import environment


@pytest.fixture
def fresh_identity(monkeypatch: pytest.MonkeyPatch) -> None:
    """Let this test's StickyServer read the environment again."""
    monkeypatch.setattr(environment, "_read", False)
    monkeypatch.setattr(environment, "_identity", None)
    monkeypatch.setattr(StickyServer, "_current", None)


@pytest.fixture
def as_worker(fresh_identity: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """This process looks like worker 2 of a master; yields the master's end of the control socket."""
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)  # a worker's StickyServer replaces it
    monkeypatch.setenv(CONTROL_FD_ENV, str(worker_end.detach()))
    monkeypatch.setenv(WORKER_SLOT_ENV, "2")
    yield master_end
    master_end.close()
    identity = environment._identity
    if identity is not None:
        identity.control.close()


def test_defaults(fresh_identity: None) -> None:
    sticky = StickyServer()
    assert sticky.is_master and sticky.worker_id is None and sticky.address is None
    assert sticky.workers == (os.cpu_count() or 1)
    assert isinstance(sticky.settings.balancer, IPHashBalancer)
    assert sticky.settings.graceful_timeout == 30.0


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"workers": 0}, "workers must be a whole number of processes, 1 or more; got 0"),
        ({"workers": True}, "got True"),
        ({"workers": 2.5}, "got 2.5"),
        (
            {"graceful_timeout": -1},
            "graceful_timeout must be a number of seconds, 0 or more and at most 2678400; got -1",
        ),
        ({"backlog": 0}, "backlog must be a whole number from 1 to 2147483647"),
        ({"balancer": "sticky"}, "unknown balancer 'sticky'"),
        (
            {"proxy_protocol": True, "forwarded_header": "x-forwarded-for"},
            "use either proxy_protocol or forwarded_header",
        ),
        ({"forwarded_header": "x forwarded"}, "forwarded_header must be an HTTP header name"),
        ({"trusted_proxies": ["10.0.0.1"]}, "trusted_proxies does nothing without proxy_protocol"),
        ({"proxy_protocol": True, "trusted_proxies": ["proxy.local"]}, "trusted proxy 'proxy.local' is not an IP"),
        ({"proxy_protocol": True, "header_timeout": 0}, "header_timeout must be a number of seconds, above 0"),
        ({"proxy_protocol": True, "max_header_size": 100}, "max_header_size must be from 256 to 65536 bytes"),
    ],
)
def test_bad_arguments_are_refused_with_the_fix(fresh_identity: None, kwargs: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        StickyServer(**kwargs)  # type: ignore[arg-type]


def test_balancer_by_name(fresh_identity: None) -> None:
    assert isinstance(StickyServer(balancer="round-robin").settings.balancer, RoundRobinBalancer)


def test_work_in_the_master_is_refused(fresh_identity: None) -> None:
    with pytest.raises(WrongProcessError, match="work\\(\\) was called in the master process; only workers work"):
        StickyServer(workers=1).work(object())


def test_listen_checks_the_port_before_anything_else(fresh_identity: None) -> None:
    with pytest.raises(ValueError, match="got 70000"):
        StickyServer(workers=1).listen(70000)


def test_listen_outside_the_main_thread_is_refused_and_frees_the_port(fresh_identity: None) -> None:
    sticky = StickyServer(workers=1)
    errors: list[BaseException] = []

    def listen() -> None:
        try:
            sticky.listen(0, "127.0.0.1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=listen)
    thread.start()
    thread.join(10)
    assert isinstance(errors[0], RuntimeError) and "main thread" in str(errors[0])
    assert sticky.address is not None
    with socket.create_server(sticky.address):  # the port was released
        pass


def test_a_worker_knows_its_slot_and_hides_the_variables_from_its_children(as_worker: socket.socket) -> None:
    sticky = StickyServer(workers=4)
    assert not sticky.is_master and sticky.worker_id == 2
    assert CONTROL_FD_ENV not in os.environ and WORKER_SLOT_ENV not in os.environ
    identity = environment.worker_identity()
    assert identity is not None and not identity.control.get_inheritable()


def test_listen_in_a_worker_is_refused(as_worker: socket.socket) -> None:
    with pytest.raises(WrongProcessError, match="listen\\(\\) was called in worker 2; only the master listens"):
        StickyServer().listen(0)


def test_work_without_add_connection_fails_before_telling_the_master_it_is_ready(as_worker: socket.socket) -> None:
    with pytest.raises(TypeError, match="add_connection"):
        StickyServer().work(object())
    as_worker.setblocking(False)
    with pytest.raises(BlockingIOError):
        as_worker.recv(100)  # no READY was sent


@pytest.mark.parametrize(
    ("fd_text", "message"),
    [("seven", "are not numbers"), ("999", "is not an open socket")],
)
def test_a_bogus_worker_environment_is_a_clear_error(
    fresh_identity: None, monkeypatch: pytest.MonkeyPatch, fd_text: str, message: str
) -> None:
    monkeypatch.setenv(CONTROL_FD_ENV, fd_text)
    monkeypatch.setenv(WORKER_SLOT_ENV, "0")
    with pytest.raises(WrongProcessError, match=f"{message}; this process was not started by a sticky_server master"):
        StickyServer()


def test_user_and_group_are_checked_up_front(fresh_identity: None) -> None:
    with pytest.raises(ValueError, match="user 'no-such-user' does not exist on this machine"):
        StickyServer(user="no-such-user")
    with pytest.raises(ValueError, match="group 'no-such-group' does not exist on this machine"):
        StickyServer(group="no-such-group")
    with pytest.raises(TypeError, match="user must be a name, a numeric id or None"):
        StickyServer(user=1.5)  # type: ignore[arg-type]
    sticky = StickyServer(user="nobody")
    assert sticky.settings.user_id == 65534 and sticky.settings.group_id is not None
    assert StickyServer(user=12345).settings.group_id is None  # a bare uid: the group is left alone


def test_proxy_settings(fresh_identity: None) -> None:
    assert StickyServer().settings.client_addresses is None
    settings = StickyServer(forwarded_header="X-Forwarded-For").settings.client_addresses
    assert settings is not None and settings.forwarded_header == "x-forwarded-for"
    assert "127.0.0.9" in settings.trusted and "::1" in settings.trusted and "10.0.0.1" not in settings.trusted
    settings = StickyServer(proxy_protocol=True, trusted_proxies="10.0.0.0/8").settings.client_addresses
    assert settings is not None and settings.proxy_protocol and "10.1.2.3" in settings.trusted


def test_a_second_sticky_server_in_a_worker_is_refused_naming_current_server(as_worker: socket.socket) -> None:
    first = StickyServer()
    assert current_server() is first
    with pytest.raises(WrongProcessError, match=r"worker 2 already has its StickyServer.*current_server\(\)"):
        StickyServer()


def test_current_server_is_the_first_made_in_the_master_too(fresh_identity: None) -> None:
    with pytest.raises(RuntimeError, match="no StickyServer has been made in this process"):
        current_server()
    first = StickyServer()
    StickyServer()  # a master may make several (tests do); the first is the process's
    assert current_server() is first


def test_settings_are_checked_once_and_resolved_the_same_everywhere() -> None:
    from sticky_server import ServerSettings

    settings = ServerSettings(3, balancer="round-robin", trusted_proxies="10.0.0.0/8", forwarded_header="Forwarded")
    assert settings.workers == 3 and type(settings.balancer).__name__ == "RoundRobinBalancer"
    assert settings.trusted_proxies == ("10.0.0.0/8",)
    assert settings.client_addresses is not None and settings.client_addresses.forwarded_header == "forwarded"
    sticky = StickyServer.from_settings(settings)
    assert sticky.settings == settings and sticky.workers == 3 and sticky.settings.balancer is settings.balancer
    assert ServerSettings().workers == (os.cpu_count() or 1)
    with pytest.raises(ValueError, match="header_timeout"):
        ServerSettings(header_timeout=float("nan"), proxy_protocol=True)
