"""A FastAPI app as its documentation writes one, run by the sticky-server command.

    sticky-server apps.fastapi_app:app --asgi -w 4

``GET /`` and the ``/ws`` websocket answer with the worker and the client address
the app sees (``request.client``), and the scheme.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request, WebSocket

from sticky_server import current_server

app = FastAPI()


@app.get("/")
def index(request: Request) -> dict[str, Any]:
    client = request.client.host if request.client else None
    return {"worker": current_server().worker_id, "client": client, "scheme": request.url.scheme}


@app.websocket("/ws")
async def echo(websocket: WebSocket) -> None:
    await websocket.accept()
    client = websocket.client.host if websocket.client else None
    async for text in websocket.iter_text():
        await websocket.send_json({"worker": current_server().worker_id, "client": client, "echo": text})
