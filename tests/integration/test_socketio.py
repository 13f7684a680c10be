"""python-socketio on 4 sticky workers: polling handshake, websocket upgrade, broadcasts everywhere once.

The control run with round-robin shows the failure stickiness prevents, so this
test is known to be able to fail.
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
from typing import Any

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE

socketio = pytest.importorskip("socketio")
aiohttp = pytest.importorskip("aiohttp")
SOCKETIO_APP = HERE / "apps" / "socketio_app.py"
CLIENTS = CLIENT_IPS[:20]
SHOUTS = ["first", "second", "third"]


async def chat(port: int, ips: list[str] = CLIENTS) -> dict[str, Any]:
    """Connect a client from each address (polling first, then websocket), shout, collect what each heard."""
    clients: dict[str, Any] = {}
    sessions = []
    heard: dict[str, list[str]] = {ip: [] for ip in ips}
    failures: dict[str, str] = {}

    async def connect(ip: str) -> None:
        # A new TCP connection per HTTP request, as separate browser connections or
        # proxies without keep-alive make: each polling request is routed on its own.
        connector = aiohttp.TCPConnector(local_addr=(ip, 0), force_close=True)
        session = aiohttp.ClientSession(connector=connector)
        sessions.append(session)
        client = socketio.AsyncClient(http_session=session, reconnection=False)
        client.on("heard", handler=lambda data: heard[ip].append(data["text"]))
        try:
            url = f"http://127.0.0.1:{port}"
            await asyncio.wait_for(client.connect(url, transports=["polling", "websocket"], wait_timeout=10), 20)
            clients[ip] = client
        except Exception as exc:
            failures[ip] = repr(exc)

    await asyncio.gather(*(connect(ip) for ip in ips))
    workers: dict[str, int] = {}
    who: dict[str, dict[str, Any]] = {}
    transports: dict[str, str] = {}
    try:
        # Broken clients (the control run) are recorded, not raised: the assertions judge.
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(client.transport() == "websocket" for client in clients.values()), 15)

        async def whoami(ip: str, client: Any) -> None:
            try:
                who[ip] = await client.call("whoami", timeout=5)
                workers[ip] = who[ip]["worker"]
            except Exception as exc:
                failures.setdefault(ip, f"whoami: {exc!r}")

        await asyncio.gather(*(whoami(ip, client) for ip, client in clients.items()))
        for n, text in enumerate(SHOUTS):
            if clients:
                with contextlib.suppress(Exception):
                    await list(clients.values())[n * 7 % len(clients)].emit("shout", text)
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(len(heard[ip]) >= len(SHOUTS) for ip in clients), 20)
        await asyncio.sleep(0.5)  # anything arriving twice would arrive now
        transports = {ip: client.transport() for ip, client in clients.items()}
    finally:
        for client in clients.values():
            with contextlib.suppress(Exception):
                await client.disconnect()
        for session in sessions:
            await session.close()
    return {
        "failures": failures,
        "heard": heard,
        "workers": workers,
        "who": who,
        "transports": transports,
        "clients": clients,
    }


def working_clients(result: dict[str, Any]) -> set[str]:
    """Clients that connected, upgraded to websocket, and heard every shout exactly once."""
    return {
        ip
        for ip in result["clients"]
        if result["transports"].get(ip) == "websocket" and sorted(result["heard"][ip]) == sorted(SHOUTS)
    }


async def wait_for(condition: Any, timeout: float) -> None:
    async with asyncio.timeout(timeout) if hasattr(asyncio, "timeout") else contextlib.nullcontext():
        while not condition():
            await asyncio.sleep(0.02)


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
    server = start_app({"APP_WORKERS": "4", "APP_BALANCER": "round-robin"}, script=SOCKETIO_APP)
    _, port = server.wait_listening(timeout=60)
    result = asyncio.run(chat(port))
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
    assert "leave the argument out" in server.output


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
