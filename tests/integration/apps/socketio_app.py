"""A python-socketio chat on aiohttp, served by sticky_server workers (for the socketio test).

Clients emit "shout" with a text; every client of every worker gets "heard" with it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from pathlib import Path

import socketio
from aiohttp import web

from sticky_server import StickyServer, Worker
from sticky_server.adapters.socketio import StickyManager


class AiohttpWorker(Worker):
    """An aiohttp application on its own event loop, fed by add_connection."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.runner = web.AppRunner(app)
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result(30)

    def add_connection(self, sock: socket.socket) -> None:
        self.loop.call_soon_threadsafe(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        server = self.runner.server
        assert server is not None
        self.loop.create_task(self.loop.connect_accepted_socket(server, sock))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    sticky = StickyServer(
        workers=int(os.environ.get("APP_WORKERS", "4")), balancer=os.environ.get("APP_BALANCER", "ip-hash")
    )
    if sticky.is_master:
        pid_dir = os.environ.get("APP_PID_DIR")
        if pid_dir:
            Path(pid_dir, f"master-{os.getpid()}").touch()
        sticky.on_listening(lambda address: print(f"LISTENING {address[0]} {address[1]}", flush=True))
        sticky.listen(0, host="127.0.0.1")
        return
    pid_dir = os.environ.get("APP_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"worker{sticky.worker_id}-{os.getpid()}").touch()
    sio = socketio.AsyncServer(async_mode="aiohttp", client_manager=StickyManager(sticky))
    app = web.Application()
    sio.attach(app)

    @sio.on("shout")  # type: ignore[untyped-decorator]
    async def shout(sid: str, text: str) -> None:
        await sio.emit("heard", {"text": text, "worker": sticky.worker_id})

    @sio.on("whoami")  # type: ignore[untyped-decorator]
    async def whoami(sid: str) -> dict[str, object]:
        return {"worker": sticky.worker_id, "pid": os.getpid()}

    sticky.work(AiohttpWorker(app))


if __name__ == "__main__":
    main()
