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

import pytest

from .conftest import HaproxyStarter, StartApp
from .harness import CLIENT_IPS, HAPROXY, exchange, expected_slot, free_port, reply_of

if HAPROXY is None:
    if os.environ.get("CI"):
        raise RuntimeError("haproxy is not installed; .ci/run installs it (apt-get install haproxy)")
    pytest.skip("haproxy is not installed (apt-get install haproxy)", allow_module_level=True)


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
                assert reply["peer"][0] == ip  # ...and so does its socket, as any server's accept loop would
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
