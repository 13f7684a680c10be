"""A python-socketio chat on aiohttp, served by sticky_server workers (for the socketio test).

Clients emit "shout" with a text; every client of every worker gets "heard" with it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import socketio
from aiohttp import web

from sticky_server import StickyServer
from sticky_server.adapters.aiohttp import AiohttpWorker
from sticky_server.adapters.socketio import StickyManager


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    sticky = StickyServer(
        workers=int(os.environ.get("APP_WORKERS", "4")),
        balancer=os.environ.get("APP_BALANCER", "ip-hash"),
        proxy_protocol=bool(os.environ.get("APP_PROXY")),
        graceful_timeout=float(os.environ.get("APP_GRACEFUL_TIMEOUT", "30")),
    )
    if sticky.is_master:
        pid_dir = os.environ.get("APP_PID_DIR")
        if pid_dir:
            Path(pid_dir, f"master-{os.getpid()}").touch()
        sticky.on_listening(lambda address: print(f"LISTENING {address[0]} {address[1]}", flush=True))
        sticky.listen(int(os.environ.get("APP_PORT", "0")), host="127.0.0.1")
        return
    pid_dir = os.environ.get("APP_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"worker{sticky.worker_id}-{os.getpid()}").touch()
    redis_url = os.environ.get("APP_REDIS_URL")
    # One machine: the sticky channel. Many machines: python-socketio's own Redis manager.
    manager = socketio.AsyncRedisManager(redis_url) if redis_url else StickyManager(sticky)
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=manager)
    app = web.Application()
    sio.attach(app)

    @sio.on("shout")  # type: ignore[untyped-decorator]
    async def shout(sid: str, text: str) -> None:
        await sio.emit("heard", {"text": text, "worker": sticky.worker_id})

    @sio.on("whoami")  # type: ignore[untyped-decorator]
    async def whoami(sid: str) -> dict[str, object]:
        client = sio.get_environ(sid)["aiohttp.request"].remote
        master = os.environ.get("APP_NAME", "")
        return {"worker": sticky.worker_id, "pid": os.getpid(), "master": master, "client": client}

    sticky.work(AiohttpWorker(app))


if __name__ == "__main__":
    main()
