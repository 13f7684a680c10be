"""Node's own socket.io client (socket.io-client from npm) against every way of serving python-socketio.

Twenty clients from twenty 127.x source addresses, polling only and then polling
plus websocket, against: python-socketio on ASGI through the command, on aiohttp
through an entry script, ``socketio.Server`` on the WSGI worker through the
command, and a Flask-SocketIO app through the command. Each client asks who serves
it (an emit with an ack, whose answer names the client address the app sees) and
hears every broadcast exactly once; with websocket allowed, every client upgrades.
The same runs with round-robin break the polling handshakes: the control that shows
these tests can fail.

The clients come from ``tests/node`` (``npm ci`` there; the fixture runs it when
``node_modules`` is missing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, run_node

CLIENTS = CLIENT_IPS[:20]
SHOUTS = ["first", "second", "third"]
CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
NODE_TIMEOUT = 90
# Long polls the control run leaves hanging would hold each stop for the whole default 30 s.
GRACEFUL_TIMEOUT = "2"

SERVERS = {
    "asgi-cli": ("apps.socketio_asgi:app", "--asgi"),
    "aiohttp-script": None,  # apps/socketio_app.py, an entry script
    "wsgi-cli": ("apps.socketio_wsgi:app", "--wsgi"),
    "flask-socketio-cli": ("apps.flask_socketio_app:app", "--wsgi"),
}
TRANSPORTS = ["polling", "polling,websocket"]


def serve(start_app: StartApp, server: str, balancer: str = "ip-hash") -> int:
    spec = SERVERS[server]
    if spec is None:
        env = {"APP_WORKERS": "4", "APP_BALANCER": balancer, "APP_GRACEFUL_TIMEOUT": GRACEFUL_TIMEOUT}
        app = start_app(env, script=HERE / "apps" / "socketio_app.py")
        return app.wait_listening(timeout=60)[1]
    target, kind = spec
    command = [sys.executable, "-m", "sticky_server", target, kind, "-w", "4", "-b", "127.0.0.1:0"]
    app = start_app(command=[*command, "--balancer", balancer, "--graceful-timeout", GRACEFUL_TIMEOUT], cwd=HERE)
    return int(app.wait_for(CLI_LISTENING, 60).group(1))


def run_clients(node_dir: Path, port: int, transports: str) -> dict[str, Any]:
    results: dict[str, Any] = run_node(
        node_dir, "chat_clients.js", f"http://127.0.0.1:{port}", transports, *CLIENTS, timeout=NODE_TIMEOUT
    )
    return results


def fully_working(results: dict[str, Any], transports: str) -> set[str]:
    final = transports.split(",")[-1]
    return {
        ip
        for ip, result in results.items()
        if result["error"] is None
        and result["transport"] == final
        and result["client"] == ip
        and sorted(result["heard"]) == sorted(SHOUTS)
    }


@pytest.mark.parametrize("transports", TRANSPORTS)
@pytest.mark.parametrize("server", list(SERVERS))
def test_node_socketio_clients_connect_and_hear_every_broadcast_once(
    start_app: StartApp, node_clients: Path, server: str, transports: str
) -> None:
    port = serve(start_app, server)
    results = run_clients(node_clients, port, transports)
    errors = {ip: result["error"] for ip, result in results.items() if result["error"]}
    assert not errors, errors
    workers = {result["worker"] for result in results.values()}
    assert len(workers) > 1, "every client on one worker proves nothing"
    broken = {ip: result for ip, result in results.items() if ip not in fully_working(results, transports)}
    assert not broken, broken


@pytest.mark.parametrize("server", list(SERVERS))
def test_without_stickiness_node_clients_break(start_app: StartApp, node_clients: Path, server: str) -> None:
    port = serve(start_app, server, balancer="round-robin")
    results = run_clients(node_clients, port, "polling")
    working = fully_working(results, "polling")
    assert len(working) < len(CLIENTS) // 2, f"round-robin left {len(working)} of 20 clients working"
