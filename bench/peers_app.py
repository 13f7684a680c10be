"""The app every server in ``bench/peers.py`` runs: python-socketio's ASGI app with a plain route and a websocket echo.

``GET /`` answers ``Hello, world!``; a websocket on ``/echo`` sends back every
message it gets; ``/socket.io/`` is python-socketio's. Served by uvicorn (alone,
with ``--workers``, or behind nginx) and by ``sticky-server bench.peers_app:app --asgi``.
"""

from __future__ import annotations

import os
from collections.abc import Awaitable, Callable
from typing import Any

import socketio

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]

BODY = b"Hello, world!"


async def plain(scope: dict[str, Any], receive: Receive, send: Send) -> None:
    if scope["type"] == "http":
        headers = [(b"content-type", b"text/plain"), (b"content-length", b"%d" % len(BODY))]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": BODY})
    elif scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.accept"})
        while True:
            event = await receive()
            if event["type"] != "websocket.receive":
                return
            await send({"type": "websocket.send", "text": event.get("text"), "bytes": event.get("bytes")})
    elif scope["type"] == "lifespan":
        while (await receive())["type"] != "lifespan.shutdown":
            await send({"type": "lifespan.startup.complete"})
        await send({"type": "lifespan.shutdown.complete"})


sio = socketio.AsyncServer(async_mode="asgi")
app = socketio.ASGIApp(sio, other_asgi_app=plain)


@sio.on("whoami")  # type: ignore[untyped-decorator]
async def whoami(sid: str) -> dict[str, int]:
    """The process that serves this session (bench/one_address.js counts sessions per process)."""
    return {"pid": os.getpid()}
