"""python-socketio's synchronous server as a WSGI app module, written for the sticky-server command.

    sticky-server apps.socketio_wsgi:app --wsgi -w 4

Threading mode: simple-websocket takes each websocket over from the WSGI worker.
"""

from __future__ import annotations

import os

import socketio

from sticky_server import current_server
from sticky_server.adapters.socketio import SyncStickyManager

sio = socketio.Server(async_mode="threading", client_manager=SyncStickyManager())
app = socketio.WSGIApp(sio)


@sio.on("shout")  # type: ignore[untyped-decorator]
def shout(sid: str, text: str) -> None:
    sio.emit("heard", {"text": text, "worker": current_server().worker_id})


@sio.on("whoami")  # type: ignore[untyped-decorator]
def whoami(sid: str) -> dict[str, object]:
    client = sio.get_environ(sid)["REMOTE_ADDR"]
    return {"worker": current_server().worker_id, "pid": os.getpid(), "client": client}
