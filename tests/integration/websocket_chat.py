"""Websocket chat clients (the ``websockets`` library), each from its own 127.x address: what each one heard."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from typing import Any

import websockets

from .harness import CLIENT_IPS


async def chat(
    port: int, path: str, clients: int, settle: float = 1.0, patience: float = 15.0
) -> dict[str, list[dict[str, Any]]]:
    """``clients`` websocket clients, each from its own address, each sending one message: what each heard
    within ``patience`` seconds (and ``settle`` more, in which a duplicate would arrive)."""
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
    _, pending = await asyncio.wait(listeners, timeout=patience)
    await asyncio.sleep(settle if not pending else 0)  # a duplicate would arrive in this time
    for task in pending:
        task.cancel()
    for socket in sockets:
        await socket.close()
    return heard


def assert_each_heard_each_once(heard: dict[str, list[dict[str, Any]]], key: str, said: str = "from {}") -> None:
    """Every client heard every client's message (``said`` of its address, under ``key``) exactly once."""
    expected = Counter({said.format(sender): 1 for sender in heard})
    for ip, messages in heard.items():
        got = Counter(entry[key] for entry in messages)
        assert got == expected, (ip, got)
