"""A Flask-SocketIO chat as its documentation writes one, run by the sticky-server command.

    sticky-server apps.flask_socketio_app:app --wsgi -w 4

The only line for sticky_server is the client manager, which shares emits across
the workers (where Flask-SocketIO's docs would put ``message_queue="redis://"``).
"""

from __future__ import annotations

import os

from flask import Flask, request
from flask_socketio import SocketIO, emit

from sticky_server import current_server
from sticky_server.adapters.socketio import SyncStickyManager

app = Flask(__name__)
socketio = SocketIO(app, async_mode="threading", client_manager=SyncStickyManager())


@app.route("/")
def index() -> str:
    return f"worker {current_server().worker_id} sees {request.remote_addr}"


@socketio.on("shout")  # type: ignore[untyped-decorator]
def shout(text: str) -> None:
    emit("heard", {"text": text, "worker": current_server().worker_id}, broadcast=True)


@socketio.on("whoami")  # type: ignore[untyped-decorator]
def whoami() -> dict[str, object]:
    return {"worker": current_server().worker_id, "pid": os.getpid(), "client": request.remote_addr}
