"""A python-socketio chat as an ASGI app module, written for the sticky-server command (no entry script).

    sticky-server apps.socketio_asgi:app --asgi -w 4

``StickyManager()`` takes the StickyServer the command made. With APP_SECOND_SERVER
set it makes a second StickyServer instead, the mistake that used to hear only its
own worker's broadcasts: that must now fail loudly.
"""

from __future__ import annotations

import os

import socketio

from sticky_server import StickyServer, current_server
from sticky_server.adapters.socketio import StickyManager

manager = StickyManager(StickyServer()) if os.environ.get("APP_SECOND_SERVER") else StickyManager()
sio = socketio.AsyncServer(async_mode="asgi", client_manager=manager)
app = socketio.ASGIApp(sio)


@sio.on("shout")  # type: ignore[untyped-decorator]
async def shout(sid: str, text: str) -> None:
    await sio.emit("heard", {"text": text, "worker": current_server().worker_id})


@sio.on("whoami")  # type: ignore[untyped-decorator]
async def whoami(sid: str) -> dict[str, object]:
    client = sio.get_environ(sid)["asgi.scope"]["client"]
    return {"worker": current_server().worker_id, "pid": os.getpid(), "client": client[0]}
