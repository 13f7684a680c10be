"""A chat on python-socketio, on 4 sticky workers: every line reaches every client, whichever worker it is on.

    python example/socketio_chat/chat_server.py [PORT] [--route-by engineio]   (default 3001, IP hash)
    python example/socketio_chat/chat_client.py alice [PORT] --source 127.0.0.2   (terminals, as many as you like)
    http://127.0.0.1:3001/                                    (the same chat in a browser)

Clients from different addresses land on different workers (a terminal client picks
its address with --source; each line shows the worker of the client who said it),
and still hear each other: the emits cross workers on the sticky channel. With
``--route-by engineio`` each client keeps its worker by its session instead, so the
tabs of one browser (one address) spread over the workers too.

Needs the socketio extra: pip install -e '.[socketio]'.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import socketio
from aiohttp import web

from sticky_server import StickyServer
from sticky_server.adapters.aiohttp import AiohttpWorker
from sticky_server.adapters.socketio import StickyManager

HERE = Path(__file__).resolve().parent

logging.basicConfig(level=logging.INFO, format="%(asctime)s %(process)d %(name)s %(levelname)s %(message)s")

arguments = sys.argv[1:]
route_by = arguments[arguments.index("--route-by") + 1] if "--route-by" in arguments else None
positional = [argument for argument in arguments if not argument.startswith("--") and argument != route_by]
port = int(positional[0]) if positional else 3001
sticky = StickyServer(workers=4, route_by=route_by)
if sticky.is_master:
    sticky.on_listening(lambda address: logging.info("chat on http://127.0.0.1:%d/", address[1]))
    sticky.listen(port)
else:
    # Emits go to the clients of every worker through the sticky channel (no Redis).
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=StickyManager(sticky))
    app = web.Application()
    sio.attach(app)

    async def index(request: web.Request) -> web.FileResponse:
        return web.FileResponse(HERE / "static" / "index.html")

    app.router.add_get("/", index)
    app.router.add_static("/static/", HERE / "static")  # socket.io.min.js: the JavaScript client, 4.8

    @sio.on("say")  # type: ignore[untyped-decorator]
    async def say(sid: str, message: dict[str, str]) -> None:
        await sio.emit("said", {"name": str(message["name"]), "text": str(message["text"]), "worker": sticky.worker_id})

    @sio.on("whoami")  # type: ignore[untyped-decorator]
    async def whoami(sid: str) -> dict[str, object]:
        return {"worker": sticky.worker_id, "client": sio.get_environ(sid)["aiohttp.request"].remote}

    sticky.work(AiohttpWorker(app))
