"""A FastAPI websocket chat with rooms on broadcaster, and server-sent events fed from the same broadcast.

    sticky-server apps.fastapi_rooms:app --asgi -w 4

``/rooms/{room}`` (websocket): every text sent is published to the room; everything
published to the room is sent back. ``GET /rooms/{room}/events``: the room as
server-sent events (sse-starlette), opening with a ``ready`` event once subscribed.
APP_BROADCAST=memory uses broadcaster's ``memory://`` (the control run).
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from broadcaster import Broadcast
from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from sse_starlette.sse import EventSourceResponse

from sticky_server import current_server
from sticky_server.adapters.broadcaster import StickyBackend

if os.environ.get("APP_BROADCAST") == "memory":
    broadcast = Broadcast("memory://")
else:
    broadcast = Broadcast(backend=StickyBackend())


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    async with broadcast:
        yield


app = FastAPI(lifespan=lifespan)


@app.websocket("/rooms/{room}")
async def chat(websocket: WebSocket, room: str) -> None:
    async with broadcast.subscribe(channel=f"room.{room}") as subscriber:  # before accept: nothing is missed
        await websocket.accept()

        async def relay() -> None:
            async for event in subscriber:  # type: ignore[union-attr]
                await websocket.send_text(event.message)  # type: ignore[union-attr]

        relaying = asyncio.create_task(relay())
        try:
            while True:
                text = await websocket.receive_text()
                message = {"text": text, "worker": current_server().worker_id}
                await broadcast.publish(channel=f"room.{room}", message=json.dumps(message))
        except WebSocketDisconnect:
            pass
        finally:
            relaying.cancel()


@app.get("/rooms/{room}/events")
async def events(room: str) -> EventSourceResponse:
    async def stream() -> AsyncIterator[dict[str, Any]]:
        async with broadcast.subscribe(channel=f"room.{room}") as subscriber:
            yield {"event": "ready", "data": str(current_server().worker_id)}
            async for event in subscriber:  # type: ignore[union-attr]
                yield {"data": event.message}  # type: ignore[union-attr]

    return EventSourceResponse(stream())
