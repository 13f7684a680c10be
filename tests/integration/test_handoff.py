"""Must hold 3: the worker gets an ordinary blocking socket of the client, unread; the master keeps no copy."""

from __future__ import annotations

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, open_fds, request, wait_until


def test_worker_gets_a_blocking_socket_whose_peer_is_the_client_and_no_byte_read(
    start_app: StartApp, steering: str
) -> None:
    server = start_app({"APP_STEERING": steering})
    address = server.wait_listening()
    for ip in CLIENT_IPS[:6]:
        with socket.create_connection(address, timeout=15, source_address=(ip, 0)) as sock:
            client_port = sock.getsockname()[1]
            # The first bytes go out before the worker can exist for this connection.
            sock.sendall(b"first-byte-intact\n")
            reply = sock.makefile("rb").readline()
        seen = json.loads(reply)
        assert seen["peer"] == [ip, client_port]
        assert seen["family"] == "AF_INET"
        assert seen["blocking"] is True
        assert seen["line"] == "first-byte-intact"


def test_ipv6_clients_get_an_ipv6_socket(start_app: StartApp, steering: str) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    server = start_app({"APP_STEERING": steering, "APP_HOST": "::1"})
    address = server.wait_listening()
    reply = request(address)
    assert reply["family"] == "AF_INET6"
    assert reply["peer"][0] == "::1"


def test_dual_stack_listener_serves_ipv4_and_ipv6(start_app: StartApp, steering: str) -> None:
    if not socket.has_dualstack_ipv6():
        pytest.skip("no dual-stack IPv6 on this machine")
    server = start_app({"APP_STEERING": steering, "APP_HOST": ""})
    _, port = server.wait_listening()
    v4 = request(("127.0.0.1", port), source="127.0.0.7")
    v6 = request(("::1", port))
    # As on an IPv4 listener: IPv4-mapped addresses are un-mapped (connections.HandedOffSocket).
    assert v4["peer"] == ["127.0.0.7", v4["peer"][1]]
    assert v6["peer"][0] == "::1"


def test_master_closes_its_copy_of_every_connection(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "2"})
    address = server.wait_listening()
    master = server.process.pid
    baseline = open_fds(master)  # before any connection: every fd one adds must go again

    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda n: request(address, source=CLIENT_IPS[n % 16]), range(400)))

    assert len(replies) == 400
    assert wait_until(lambda: open_fds(master) == baseline, timeout=10), (open_fds(master), baseline)
