"""A chat on python-socketio, on 4 sticky workers: every line reaches every client, whichever worker it is on.

    python example/socketio_chat/chat_server.py [PORT]        (default 3001)
    python example/socketio_chat/chat_client.py alice [PORT]  (in as many terminals as you like)

Needs the socketio extras: pip install -e '.[test]' (or python-socketio[asyncio_client] and aiohttp).
"""

from __future__ import annotations

import logging
import sys

import socketio
from aiohttp import web

from sticky_server import StickyServer
from sticky_server.adapters.aiohttp import AiohttpWorker
from sticky_server.adapters.socketio import StickyManager

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

port = int(sys.argv[1]) if len(sys.argv) > 1 else 3001
sticky = StickyServer(workers=4)
if sticky.is_master:
    sticky.listen(port)
else:
    # Emits go to the clients of every worker through the sticky channel (no Redis).
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=StickyManager(sticky))
    app = web.Application()
    sio.attach(app)

    @sio.on("say")  # type: ignore[untyped-decorator]
    async def say(sid: str, message: dict[str, str]) -> None:
        await sio.emit("said", {**message, "worker": sticky.worker_id})

    sticky.work(AiohttpWorker(app))
