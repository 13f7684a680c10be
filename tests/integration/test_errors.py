"""Must hold 6 and 7: clear errors, nothing left behind; port 0 and the bound address."""

from __future__ import annotations

import ctypes
import os
import socket
from pathlib import Path

import pytest

from sticky_server.balancer import IPHashBalancer, address_key

from .conftest import StartApp
from .harness import CLIENT_IPS, request


def test_port_in_use_is_a_clear_error_and_starts_no_worker(start_app: StartApp) -> None:
    with socket.create_server(("127.0.0.1", 0)) as holder:
        port = holder.getsockname()[1]
        server = start_app({"APP_PORT": str(port)})
        assert server.wait_exit(timeout=30) != 0
    last = server.lines[-1]
    assert f"BindError: [Errno 98] cannot listen on 127.0.0.1:{port}: the address is already in use" in last
    assert "choose another port" in last
    assert server.recorded_pids("worker") == []


@pytest.mark.parametrize(
    ("port", "message"),
    [
        ("70000", "ValueError: port must be from 0 to 65535 (0 picks a free port), got 70000"),
        ("-1", "ValueError: port must be from 0 to 65535 (0 picks a free port), got -1"),
    ],
)
def test_bad_port_is_a_clear_error(start_app: StartApp, port: str, message: str) -> None:
    server = start_app({"APP_PORT": port})
    assert server.wait_exit(timeout=30) != 0
    assert server.lines[-1] == message
    assert server.recorded_pids("worker") == []


def drop_bind_capability() -> None:
    """In the child before exec: lose CAP_NET_BIND_SERVICE for good, as an unprivileged user has."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_CAPBSET_DROP, CAP_NET_BIND_SERVICE, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


PR_CAPBSET_DROP = 24
CAP_NET_BIND_SERVICE = 10


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to drop the capability to bind low ports")
def test_privileged_port_without_the_capability_is_a_clear_error(start_app: StartApp) -> None:
    unprivileged_start = int(Path("/proc/sys/net/ipv4/ip_unprivileged_port_start").read_text())
    if unprivileged_start <= 80:
        pytest.skip("this system lets everyone bind port 80")
    server = start_app({"APP_PORT": "80"}, preexec_fn=drop_bind_capability)
    assert server.wait_exit(timeout=30) != 0
    assert "cannot listen on 127.0.0.1:80: permission denied" in server.lines[-1]
    assert "use a port of 1024 or above" in server.lines[-1]


def test_worker_without_add_connection_stops_the_server_with_a_clear_error(start_app: StartApp) -> None:
    server = start_app({"APP_MODE": "no_add_connection"})
    assert server.wait_exit(timeout=30) != 0
    output = server.output
    assert "TypeError: work() needs an object with an add_connection(sock) method; object has none." in output
    assert "WorkerBootError: worker " in server.lines[-1] and "before it was ready" in server.lines[-1]
    assert "LISTENING" not in output
    # (the fixture checks that no worker process is left)


def test_work_called_in_the_master_is_a_clear_error(start_app: StartApp) -> None:
    server = start_app({"APP_MODE": "work_in_master"})
    assert server.wait_exit(timeout=30) != 0
    assert server.lines[-1].startswith(
        "sticky_server.errors.WrongProcessError: work() was called in the master process; only workers work."
    )
    assert server.recorded_pids("worker") == []


def test_listen_called_in_a_worker_is_a_clear_error(start_app: StartApp) -> None:
    server = start_app({"APP_MODE": "listen_in_worker"})
    assert server.wait_exit(timeout=30) != 0
    assert "WrongProcessError: listen() was called in worker" in server.output
    assert "WorkerBootError" in server.lines[-1]


def test_add_connection_raising_closes_that_socket_and_the_worker_keeps_serving(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "1", "APP_RAISE_FOR": "127.0.0.250"})
    address = server.wait_listening()
    first = request(address, source=CLIENT_IPS[0])

    with socket.create_connection(address, timeout=15, source_address=("127.0.0.250", 0)) as sock:
        assert sock.recv(100) == b""  # closed by the worker, not left hanging

    match = server.wait_for(r"worker 0: add_connection raised; closed the connection from 127\.0\.0\.250:\d+")
    traceback_at = server.lines.index(match.string)
    assert "Traceback (most recent call last):" in server.lines[traceback_at + 1]
    assert "RuntimeError: add_connection refuses 127.0.0.250 on purpose" in server.output
    assert request(address, source=CLIENT_IPS[1])["pid"] == first["pid"]


@pytest.mark.parametrize(
    ("balancer", "fault"),
    [("garbage", "returned 99"), ("raises", "raised RuntimeError"), ("slow", r"took \d+ ms to pick \(over 50 ms\)")],
)
def test_a_bad_balancer_is_logged_once_and_loses_no_connection(start_app: StartApp, balancer: str, fault: str) -> None:
    server = start_app({"APP_BALANCER": balancer})
    address = server.wait_listening()
    replies = [request(address, source=ip) for ip in CLIENT_IPS for _ in range(2)]
    assert len(replies) == 2 * len(CLIENT_IPS)
    # Every one went where the fallback (IP hash) sends it.
    assert all(
        reply["slot"] == IPHashBalancer().slot_for_key(address_key(reply["peer"][0]), (0, 1, 2)) for reply in replies
    )
    assert server.count(rf"balancer \w+ {fault}") == 1
    assert "routing such connections by IP hash instead" in server.output


def test_port_zero_picks_a_free_port_and_logs_it(start_app: StartApp) -> None:
    server = start_app()
    host, port = server.wait_listening()
    assert host == "127.0.0.1" and port > 0
    server.wait_for(rf"listening on 127\.0\.0\.1:{port} with 3 workers")
    assert request((host, port))["line"] == "hello"
