"""FastAPI, Flask, aiohttp and Django apps, written the way their docs show, run by the sticky-server command.

Behind the real HAProxy, as in production: with ``send-proxy-v2`` (TCP mode) and with
``option forwardfor`` (HTTP mode). Each client, from its own 127.x address, makes
keep-alive requests on one connection (and a websocket, for FastAPI): every answer
comes from the worker its address hashes to, and the app itself sees the client's
address (``request.client``, ``REMOTE_ADDR``, ``request.remote``), not HAProxy's.
"""

from __future__ import annotations

import http.client
import json
import socket
import sys
from typing import Any

import pytest

from .conftest import HaproxyStarter, StartApp
from .harness import CLIENT_IPS, HERE, expected_slot

CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
CLIENTS = CLIENT_IPS[:8]
REQUESTS_PER_CONNECTION = 3

APPS = {
    "fastapi": ("apps.fastapi_app:app", "--asgi", "fastapi"),
    "flask": ("apps.flask_app:app", "--wsgi", "flask"),
    "aiohttp": ("apps.aiohttp_app:app", "--aiohttp", "aiohttp"),
    "django-asgi": ("apps.django_app:asgi_application", "--asgi", "django"),
    "django-wsgi": ("apps.django_app:wsgi_application", "--wsgi", "django"),
}
MODES = {
    # frontend, the command's proxy option
    "send-proxy-v2": ("v2_port", ["--proxy-protocol"]),
    "x-forwarded-for": ("http_port", ["--forwarded-header", "x-forwarded-for"]),
}


def serve(start_app: StartApp, app: str, options: list[str]) -> int:
    target, _kind, package = APPS[app]
    pytest.importorskip(package)
    # No kind flag: the command tells the apps apart, as a user would expect (the flag is in APPS for reference).
    command = [sys.executable, "-m", "sticky_server", target, "-w", "4", "-b", "127.0.0.1:0"]
    server = start_app(command=[*command, *options, "--graceful-timeout", "2"], cwd=HERE)
    return int(server.wait_for(CLI_LISTENING, 60).group(1))


def keep_alive_requests(frontend: tuple[str, int], source: str) -> list[dict[str, Any]]:
    """REQUESTS_PER_CONNECTION requests on one connection from ``source``; fails if the connection changes."""
    connection = http.client.HTTPConnection(*frontend, timeout=10, source_address=(source, 0))
    answers = []
    try:
        for _ in range(REQUESTS_PER_CONNECTION):
            connection.request("GET", "/")
            sock = connection.sock
            response = connection.getresponse()
            body = response.read()
            assert response.status == 200, (response.status, body[:300])
            assert not response.will_close, "the app closed a keep-alive connection"
            assert connection.sock is sock
            answers.append(json.loads(body))
    finally:
        connection.close()
    return answers


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("app", list(APPS))
def test_framework_app_behind_haproxy_sees_the_client_and_keeps_it_on_its_worker(
    start_app: StartApp, start_haproxy: HaproxyStarter, app: str, mode: str
) -> None:
    frontend_name, options = MODES[mode]
    port = serve(start_app, app, options)
    frontend = start_haproxy(port, port)[frontend_name]
    for ip in CLIENTS:
        for answer in keep_alive_requests(frontend, ip):
            assert answer["client"] == ip, (ip, answer)
            assert answer["worker"] == expected_slot(ip, 4), (ip, answer)
            assert answer["scheme"] == "http"
    assert len({expected_slot(ip, 4) for ip in CLIENTS}) > 1


def test_fastapi_websocket_behind_haproxy_sees_the_client(start_app: StartApp, start_haproxy: HaproxyStarter) -> None:
    sync_client = pytest.importorskip("websockets.sync.client")
    port = serve(start_app, "fastapi", ["--proxy-protocol"])
    frontend = start_haproxy(port, port)["v2_port"]
    for ip in CLIENTS:
        sock = socket.create_connection(frontend, timeout=10, source_address=(ip, 0))
        with sync_client.connect(f"ws://{frontend[0]}:{frontend[1]}/ws", sock=sock, open_timeout=10) as websocket:
            for n in range(3):
                websocket.send(f"hello {n}")
                answer = json.loads(websocket.recv(timeout=10))
                assert answer == {"worker": expected_slot(ip, 4), "client": ip, "echo": f"hello {n}"}


def test_without_the_proxy_option_the_app_sees_haproxy_and_one_worker(
    start_app: StartApp, start_haproxy: HaproxyStarter
) -> None:
    """The control: HAProxy in HTTP mode but the command not told to believe it (Flask reads no header itself)."""
    port = serve(start_app, "flask", [])
    frontend = start_haproxy(port, port)["http_port"]
    answers = [answer for ip in CLIENTS for answer in keep_alive_requests(frontend, ip)]
    assert {answer["client"] for answer in answers} == {"127.0.0.1"}
    assert len({answer["worker"] for answer in answers}) == 1
