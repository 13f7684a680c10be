"""python-socketio's own asyncio client, 20 of them from distinct addresses (test_socketio, test_two_machines)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import aiohttp
import socketio

from .harness import CLIENT_IPS

CLIENTS = CLIENT_IPS[:20]
SHOUTS = ["first", "second", "third"]


async def chat(port: int, ips: list[str] = CLIENTS, patience: float = 1.0) -> dict[str, Any]:
    """Connect a client from each address (polling first, then websocket), shout, collect what each heard.

    ``patience`` scales every wait (a control run that expects broken clients need not wait them out)."""
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
            connecting = client.connect(url, transports=["polling", "websocket"], wait_timeout=10 * patience)
            await asyncio.wait_for(connecting, 20 * patience)
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
            await wait_for(lambda: all(client.transport() == "websocket" for client in clients.values()), 15 * patience)

        async def whoami(ip: str, client: Any) -> None:
            try:
                who[ip] = await client.call("whoami", timeout=5 * patience)
                workers[ip] = who[ip]["worker"]
            except Exception as exc:
                failures.setdefault(ip, f"whoami: {exc!r}")

        await asyncio.gather(*(whoami(ip, client) for ip, client in clients.items()))
        for n, text in enumerate(SHOUTS):
            if clients:
                with contextlib.suppress(Exception):
                    await list(clients.values())[n * 7 % len(clients)].emit("shout", text)
        with contextlib.suppress(TimeoutError):
            await wait_for(lambda: all(len(heard[ip]) >= len(SHOUTS) for ip in clients), 20 * patience)
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
