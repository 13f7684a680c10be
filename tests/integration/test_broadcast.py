"""Broadcast across workers with no Redis, for apps other than socket.io, through the command.

- The Django Channels tutorial's chat on ``StickyChannelLayer``, 4 workers: 20 websocket
  clients (the ``websockets`` library) from 20 addresses, each sends one message, and
  each message reaches all 20 exactly once (400/400). Control: channels' own
  ``InMemoryChannelLayer`` (what Django Channels uses without Redis) loses most of them,
  and the server warns at start, naming the sticky layer.
"""

from __future__ import annotations

import asyncio
import json
import sys
from collections import Counter
from typing import Any

import pytest
import websockets

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE

CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
CLIENTS = 20


async def chat(port: int, path: str, clients: int, settle: float = 2.0) -> dict[str, list[dict[str, Any]]]:
    """``clients`` websocket clients, each from its own address, each sending one message: what each heard."""
    sockets = [
        await websockets.connect(f"ws://127.0.0.1:{port}{path}", local_addr=(CLIENT_IPS[n], 0), open_timeout=10)
        for n in range(clients)
    ]
    heard: dict[str, list[dict[str, Any]]] = {CLIENT_IPS[n]: [] for n in range(clients)}

    async def listen(ip: str, socket: Any) -> None:
        while len(heard[ip]) < clients:
            heard[ip].append(json.loads(await socket.recv()))

    listeners = [asyncio.create_task(listen(ip, socket)) for ip, socket in zip(heard, sockets, strict=True)]
    for ip, socket in zip(heard, sockets, strict=True):
        await socket.send(json.dumps({"message": f"from {ip}"}))
    _, pending = await asyncio.wait(listeners, timeout=15)
    await asyncio.sleep(settle if not pending else 0)  # a duplicate would arrive in this time
    for task in pending:
        task.cancel()
    for socket in sockets:
        await socket.close()
    return heard


def serve(start_app: StartApp, target: str, *flags: str, env: dict[str, str] | None = None) -> Any:
    command = [sys.executable, "-m", "sticky_server", target, "--asgi", "-w", "4", "-b", "127.0.0.1:0", *flags]
    return start_app(command=[*command, "--graceful-timeout", "2"], cwd=HERE, env=env)


@pytest.mark.parametrize("layer", ["sticky", "in-memory"])
def test_the_channels_tutorial_chat_reaches_every_client_on_every_worker(start_app: StartApp, layer: str) -> None:
    env = {"APP_LAYER": "channels.layers.InMemoryChannelLayer"} if layer == "in-memory" else None
    app = serve(start_app, "apps.django_chat:application", env=env)
    port = int(app.wait_for(CLI_LISTENING, 60).group(1))
    heard = asyncio.run(chat(port, "/ws/chat/lobby/", CLIENTS))
    workers = Counter(entry["worker"] for messages in heard.values() for entry in messages)
    deliveries = sum(len(messages) for messages in heard.values())
    if layer == "in-memory":
        assert deliveries < CLIENTS * CLIENTS, "the in-memory layer reached every worker's clients"
        app.wait_for(r"InMemoryChannelLayer.*keeps each worker's.*StickyChannelLayer", 5)
        return
    for ip, messages in heard.items():
        got = Counter(entry["message"] for entry in messages)
        assert got == Counter({f"from {sender}": 1 for sender in heard}), (ip, got)  # each once, none missing
    assert deliveries == CLIENTS * CLIENTS
    assert len(workers) >= 3, workers  # the clients were spread over the workers
