"""python-socketio on 4 sticky workers: polling handshake, websocket upgrade, broadcasts everywhere once.

The control run with round-robin shows the failure stickiness prevents, so this
test is known to be able to fail.
"""

from __future__ import annotations

import asyncio
import sys

import pytest

from .conftest import StartApp
from .harness import HERE
from .socketio_clients import CLIENTS, SHOUTS, chat, working_clients

socketio = pytest.importorskip("socketio")
aiohttp = pytest.importorskip("aiohttp")
SOCKETIO_APP = HERE / "apps" / "socketio_app.py"


def test_socketio_clients_on_four_workers_connect_upgrade_and_hear_every_broadcast_once(
    start_app: StartApp,
) -> None:
    server = start_app({"APP_WORKERS": "4"}, script=SOCKETIO_APP)
    _, port = server.wait_listening(timeout=60)
    result = asyncio.run(chat(port))
    working = working_clients(result)
    print(f"ip-hash: {len(working)} of 20 clients fully working, on workers {sorted(set(result['workers'].values()))}")
    assert not result["failures"], result["failures"]
    assert len(result["clients"]) == 20
    assert set(result["transports"].values()) == {"websocket"}
    assert len(set(result["workers"].values())) > 1, "every client on one worker proves nothing"
    for ip in CLIENTS:
        assert sorted(result["heard"][ip]) == sorted(SHOUTS), (ip, result["heard"][ip])
    assert working == set(CLIENTS)


def test_without_stickiness_the_handshake_breaks(start_app: StartApp) -> None:
    env = {"APP_WORKERS": "4", "APP_BALANCER": "round-robin", "APP_GRACEFUL_TIMEOUT": "3"}
    server = start_app(env, script=SOCKETIO_APP)  # (broken sessions hold long polls: no need to wait on stop)
    _, port = server.wait_listening(timeout=60)
    result = asyncio.run(chat(port, patience=0.25))  # broken clients are expected: no need to wait them out
    working = working_clients(result)
    print(f"round-robin: {len(result['failures'])} of 20 failed to connect, {len(working)} fully working")
    assert len(working) < len(CLIENTS), "without stickiness every client still worked: this test cannot fail"


CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"


def test_socketio_asgi_app_under_the_command_broadcasts_across_workers(start_app: StartApp) -> None:
    """As a CLI user writes it: StickyManager() with no argument, in the app module."""
    command = [sys.executable, "-m", "sticky_server", "apps.socketio_asgi:app", "--asgi", "-w", "4"]
    server = start_app(command=[*command, "-b", "127.0.0.1:0"], cwd=HERE)
    port = int(server.wait_for(CLI_LISTENING, 60).group(1))
    result = asyncio.run(chat(port))
    working = working_clients(result)
    assert len(working) == 20, result["failures"]
    assert len(set(result["workers"].values())) > 1  # the broadcasts crossed workers


def test_a_second_sticky_server_in_a_worker_fails_loudly(start_app: StartApp) -> None:
    command = [sys.executable, "-m", "sticky_server", "apps.socketio_asgi:app", "--asgi", "-w", "2"]
    server = start_app(command=[*command, "-b", "127.0.0.1:0"], cwd=HERE, env={"APP_SECOND_SERVER": "1"})
    assert server.wait_exit(60) != 0
    assert "already has its StickyServer" in server.output and "current_server()" in server.output


@pytest.mark.parametrize("target", ["apps.socketio_wsgi:app", "apps.flask_socketio_app:app"])
def test_synchronous_socketio_on_the_wsgi_worker_upgrades_and_broadcasts_across_workers(
    start_app: StartApp, target: str
) -> None:
    """socketio.Server and Flask-SocketIO in threading mode: websockets through gunicorn's socket, sync manager."""
    pytest.importorskip("gunicorn")
    pytest.importorskip("simple_websocket")
    if "flask" in target:
        pytest.importorskip("flask_socketio")
    command = [sys.executable, "-m", "sticky_server", target, "--wsgi", "-w", "4", "-b", "127.0.0.1:0"]
    server = start_app(command=command, cwd=HERE)
    port = int(server.wait_for(CLI_LISTENING, 60).group(1))
    result = asyncio.run(chat(port))
    working = working_clients(result)
    assert not result["failures"], result["failures"]
    assert len(set(result["workers"].values())) > 1, "every client on one worker proves nothing"
    assert working == set(CLIENTS), {ip: (result["transports"].get(ip), result["heard"][ip]) for ip in CLIENTS}
