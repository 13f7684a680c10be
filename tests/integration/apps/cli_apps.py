"""Targets for the command-line tests: a worker factory and an ASGI app, each saying who served the request."""

from __future__ import annotations

import asyncio
import json
import os
import socket
from typing import Any

from sticky_server import StickyServer, client_address

STATE = {"started": False}


class LineWorker:
    """A worker factory taking the StickyServer: answers each connection with one JSON line and closes it."""

    def __init__(self, sticky: StickyServer) -> None:
        self.slot = sticky.worker_id

    def add_connection(self, sock: socket.socket) -> None:
        with sock:
            sock.recv(1024)
            host, port = client_address(sock)
            sock.sendall(json.dumps({"slot": self.slot, "pid": os.getpid(), "peer": [host, port]}).encode() + b"\n")


async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                STATE["started"] = True
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await send({"type": "lifespan.shutdown.complete"})
                return
    elif scope["type"] == "http":
        loop = type(asyncio.get_running_loop()).__module__.split(".")[0]
        body = json.dumps(
            {"pid": os.getpid(), "client": scope["client"][0], "started": STATE["started"], "loop": loop}
        ).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})


def broken() -> None:
    raise RuntimeError("this factory is never reached")


class HoldingWorker:
    """A worker factory that keeps every connection open, unread, until it stops (live connections to look at)."""

    def __init__(self, sticky: StickyServer) -> None:
        self.held: list[socket.socket] = []

    def add_connection(self, sock: socket.socket) -> None:
        self.held.append(sock)

    def stop(self) -> None:
        for sock in self.held:
            sock.close()


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    """A WSGI app answering who served the request."""
    body = json.dumps({"pid": os.getpid(), "path": environ["PATH_INFO"]}).encode()
    start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
    return [body]
