"""A plain FastAPI websocket app where a document's editors must meet on one worker, run by the command.

    sticky-server apps.doc_app:app --asgi -w 4 --route-by path:2

``/doc/{doc_id}`` is a websocket; its first message back names the worker and the
document, as an app keeping each document's editors in memory would need.
``GET /doc/{doc_id}/who`` answers the same over plain HTTP.
"""

from __future__ import annotations

from fastapi import FastAPI, WebSocket

from sticky_server import current_server

app = FastAPI()


@app.get("/doc/{doc_id}/who")
async def who(doc_id: str) -> dict[str, object]:
    return {"worker": current_server().worker_id, "doc": doc_id}


@app.websocket("/doc/{doc_id}")
async def edit(websocket: WebSocket, doc_id: str) -> None:
    await websocket.accept()
    await websocket.send_json({"worker": current_server().worker_id, "doc": doc_id})
    await websocket.receive_text()  # until the client says it is done
    await websocket.close()
