"""The real HAProxy (Debian's package) in front: stickiness by the real client address.

HAProxy connects to the sticky master from 127.0.0.1, so without the PROXY
protocol or a forwarded header every client would look alike and land on one
worker. Clients connect to HAProxy from distinct 127.x addresses; each must
always reach the worker its own address hashes to, and the worker must see that
address through ``client_address``.
"""

from __future__ import annotations

import collections
import os
import shutil
import socket
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, exchange, pid_alive, reply_of, stop_process, wait_until
from .test_proxy import expected_slot

HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)

if HAPROXY is None:
    if os.environ.get("CI"):
        raise RuntimeError("haproxy is not installed; .ci/run installs it (apt-get install haproxy)")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)

CONFIG = """
global
    maxconn 2000
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tcp_v1
    mode tcp
    bind 127.0.0.1:{v1_port}
    default_backend sticky_v1
backend sticky_v1
    mode tcp
    server master 127.0.0.1:{tcp_port} send-proxy
frontend tcp_v2
    mode tcp
    bind 127.0.0.1:{v2_port}
    default_backend sticky_v2
backend sticky_v2
    mode tcp
    server master 127.0.0.1:{tcp_port} send-proxy-v2
frontend web
    mode http
    bind 127.0.0.1:{http_port}
    option forwardfor
    default_backend sticky_http
backend sticky_http
    mode http
    http-reuse never
    server master 127.0.0.1:{http_backend_port}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


HaproxyStarter = Callable[[int, int], dict[str, tuple[str, int]]]


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[HaproxyStarter]:
    """Run HAProxy in the foreground (-db) in front of the given ports; stop it by pid afterwards."""
    processes: list[subprocess.Popen[bytes]] = []

    def start(tcp_port: int, http_backend_port: int) -> dict[str, tuple[str, int]]:
        ports = {"v1_port": free_port(), "v2_port": free_port(), "http_port": free_port()}
        config = tmp_path / "haproxy.cfg"
        config.write_text(CONFIG.format(tcp_port=tcp_port, http_backend_port=http_backend_port, **ports))
        assert HAPROXY is not None
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)

        def listening() -> bool:
            for port in ports.values():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True

        if not wait_until(listening, timeout=15):
            process.kill()
            output = process.communicate(timeout=10)[0].decode(errors="replace")
            raise AssertionError(f"haproxy did not start:\n{output}")
        return {name: ("127.0.0.1", port) for name, port in ports.items()}

    yield start

    for process in processes:
        stop_process(process)
        assert not pid_alive(process.pid)


def test_haproxy_send_proxy_v1_and_v2_keep_each_client_on_its_worker(
    start_app: StartApp, start_haproxy: HaproxyStarter
) -> None:
    sticky = start_app({"APP_WORKERS": "4", "APP_PROXY": "1"})
    sticky_address = sticky.wait_listening()
    frontends = start_haproxy(sticky_address[1], sticky_address[1])

    for frontend in ("v1_port", "v2_port"):
        seen: dict[str, set[int]] = collections.defaultdict(set)
        for _ in range(3):
            for ip in CLIENT_IPS[:20]:
                reply = reply_of(exchange(frontends[frontend], b"through haproxy\n", source=ip))
                assert reply["line"] == "through haproxy"
                assert reply["client"][0] == ip, (frontend, reply)  # the worker sees the real client
                assert reply["peer"][0] == "127.0.0.1"  # ...while its socket peer is HAProxy
                seen[ip].add(reply["slot"])
        assert all(len(slots) == 1 for slots in seen.values()), (frontend, seen)
        assert {ip: next(iter(slots)) for ip, slots in seen.items()} == {
            ip: expected_slot(ip, 4) for ip in CLIENT_IPS[:20]
        }, frontend
        assert len({next(iter(slots)) for slots in seen.values()}) > 1, f"{frontend}: every client on one worker"


def test_haproxy_http_mode_x_forwarded_for_keeps_each_client_on_its_worker(
    start_app: StartApp, start_haproxy: HaproxyStarter
) -> None:
    sticky = start_app({"APP_WORKERS": "4", "APP_FORWARDED": "x-forwarded-for", "APP_MODE": "http"})
    sticky_address = sticky.wait_listening()
    frontends = start_haproxy(free_port(), sticky_address[1])

    seen: dict[str, set[int]] = collections.defaultdict(set)
    for _ in range(3):
        for ip in CLIENT_IPS[:20]:
            answer = exchange(
                frontends["http_port"], b"GET /hello HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n", source=ip
            )
            assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
            reply = reply_of(answer)
            assert reply["line"] == "GET /hello HTTP/1.1"
            assert f"x-forwarded-for: {ip}" in [header.lower() for header in reply["headers"]], reply
            assert reply["client"][0] == ip
            seen[ip].add(reply["slot"])
    assert {ip: next(iter(slots)) for ip, slots in seen.items()} == {ip: expected_slot(ip, 4) for ip in CLIENT_IPS[:20]}
    assert len({next(iter(slots)) for slots in seen.values()}) > 1
