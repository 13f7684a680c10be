"""One small web app served through each adapter (APP_ADAPTER), the same routes everywhere.

GET /       JSON: adapter, slot, pid, the client address the app saw, whether startup ran
GET /slow   the same after 1 s (a request in flight when the worker is told to stop)
/ws         (aiohttp, asgi, tornado) a websocket answering each text with JSON: slot, echo

When a worker has finished stopping (the framework's shutdown hook, or the
adapter's stop for servers that have none) it writes APP_SHUTDOWN_DIR/<slot>-<pid>.
APP_TLS_CERT and APP_TLS_KEY turn on TLS in the worker; APP_ROUTE_BY sets ``route_by``. Every process records its
pid in APP_PID_DIR.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import ssl
import time
from http.server import BaseHTTPRequestHandler
from pathlib import Path
from typing import Any

from sticky_server import StickyServer, client_address


def say(line: str) -> None:
    """One line on stdout in one write: lines from the master and its workers never interleave."""
    os.write(1, (line + "\n").encode())


ADAPTER = os.environ.get("APP_ADAPTER", "http")
SLOW_SECONDS = 1.0


def record_pid(role: str) -> None:
    pid_dir = os.environ.get("APP_PID_DIR")
    if pid_dir:
        Path(pid_dir, f"{role}-{os.getpid()}").touch()


def shutdown_ran(slot: int, what: str) -> None:
    folder = os.environ.get("APP_SHUTDOWN_DIR")
    if folder:
        Path(folder, f"{slot}-{os.getpid()}").write_text(what)


def tls_context() -> ssl.SSLContext | None:
    cert = os.environ.get("APP_TLS_CERT")
    if not cert:
        return None
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, os.environ["APP_TLS_KEY"])
    return context


def slow_started(slot: int) -> None:
    """Tests wait for this line before they stop the server, so the request is surely in flight."""
    say(f"SLOW STARTED {slot}")


def reply(slot: int, client: tuple[str, int], started: bool) -> bytes:
    body = {"adapter": ADAPTER, "slot": slot, "pid": os.getpid(), "client": list(client), "started": started}
    try:
        body["loop"] = type(asyncio.get_running_loop()).__module__.split(".")[0]
    except RuntimeError:  # a worker of threads
        body["loop"] = None
    return json.dumps(body).encode()


def http_worker(slot: int) -> Any:
    from sticky_server.adapters.stdlib import HTTPWorker

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"  # keep-alive

        def do_GET(self) -> None:
            if self.path == "/slow":
                slow_started(slot)
                time.sleep(SLOW_SECONDS)
            body = reply(slot, (self.client_address[0], self.client_address[1]), True)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass

    class Stopping(HTTPWorker):
        def stop(self) -> None:
            super().stop()
            shutdown_ran(slot, "http.server stopped")

    return Stopping(Handler, ssl_context=tls_context())


def wsgi_worker(slot: int) -> Any:
    from sticky_server.adapters.stdlib import WSGIWorker

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/slow":
            slow_started(slot)
            time.sleep(SLOW_SECONDS)
        body = reply(slot, (environ["REMOTE_ADDR"], 0), True)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    class Stopping(WSGIWorker):
        def stop(self) -> None:
            super().stop()
            shutdown_ran(slot, "wsgiref stopped")

    return Stopping(app, ssl_context=tls_context())


def gunicorn_worker(slot: int) -> Any:
    """adapters.wsgi.WSGIWorker: gunicorn's HTTP/1.1 parser, websockets through simple-websocket."""
    import simple_websocket

    from sticky_server.adapters.wsgi import WSGIWorker

    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        if environ["PATH_INFO"] == "/ws":
            ws = simple_websocket.Server(environ)
            try:
                while True:
                    text = ws.receive()
                    ws.send(json.dumps({"slot": slot, "echo": text}))
            except simple_websocket.ConnectionClosed:
                pass
            raise StopIteration  # the connection was the websocket's: no HTTP response (as flask-sock does)
        if environ["PATH_INFO"] == "/slow":
            slow_started(slot)
            time.sleep(SLOW_SECONDS)
        body = reply(slot, (environ["REMOTE_ADDR"], int(environ["REMOTE_PORT"])), True)
        start_response("200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))])
        return [body]

    class Stopping(WSGIWorker):
        def stop(self) -> None:
            super().stop()
            shutdown_ran(slot, "gunicorn wsgi stopped")

    return Stopping(app, ssl_context=tls_context())


def asyncio_worker(slot: int) -> Any:
    from sticky_server.adapters.asyncio import AsyncioWorker

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A minimal HTTP/1.1 keep-alive server on streams: GET only, no bodies.
        client = client_address(writer.get_extra_info("socket"))
        try:
            while True:
                read_head = asyncio.ensure_future(reader.readuntil(b"\r\n\r\n"))
                stopping = asyncio.ensure_future(worker.stopping.wait())
                await asyncio.wait({read_head, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if not read_head.done():  # idle while the worker stops: end the connection
                    read_head.cancel()
                    return
                head = read_head.result()
                if head.startswith(b"GET /slow "):
                    slow_started(slot)
                    await asyncio.sleep(SLOW_SECONDS)
                body = reply(slot, client, True)
                writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n")
                writer.write(b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            return
        finally:
            writer.close()

    class Stopping(AsyncioWorker):
        async def stop(self) -> None:
            await super().stop()
            shutdown_ran(slot, "asyncio stopped")

    worker = Stopping(client_connected=handle, ssl_context=tls_context())
    return worker


def aiohttp_worker(slot: int) -> Any:
    from aiohttp import WSMsgType, web

    from sticky_server.adapters.aiohttp import AiohttpWorker

    app = web.Application()
    sockets: set[web.WebSocketResponse] = set()
    started: list[bool] = []

    async def index(request: web.Request) -> web.Response:
        if request.path == "/slow":
            slow_started(slot)
            await asyncio.sleep(SLOW_SECONDS)
        peer = request.transport.get_extra_info("socket") if request.transport else None
        client = client_address(peer) if peer is not None else ("", 0)
        return web.Response(body=reply(slot, client, bool(started)), content_type="application/json")

    async def ws(request: web.Request) -> web.WebSocketResponse:
        socket_ = web.WebSocketResponse()
        await socket_.prepare(request)
        sockets.add(socket_)
        try:
            async for message in socket_:
                if message.type == WSMsgType.TEXT:
                    await socket_.send_str(json.dumps({"slot": slot, "echo": message.data}))
        finally:
            sockets.discard(socket_)
        return socket_

    async def on_startup(app: web.Application) -> None:
        started.append(True)

    async def on_shutdown(app: web.Application) -> None:
        for socket_ in list(sockets):
            await socket_.close()

    async def on_cleanup(app: web.Application) -> None:
        shutdown_ran(slot, "aiohttp on_cleanup ran")

    app.router.add_get("/", index)
    app.router.add_get("/slow", index)
    app.router.add_get("/ws", ws)
    app.on_startup.append(on_startup)
    app.on_shutdown.append(on_shutdown)
    app.on_cleanup.append(on_cleanup)
    return AiohttpWorker(app, ssl_context=tls_context())


def asgi_worker(slot: int) -> Any:
    from sticky_server.adapters.asgi import ASGIWorker

    state = {"started": False}

    async def send_json(send: Any, body: bytes) -> None:
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    state["started"] = True
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    shutdown_ran(slot, "asgi lifespan shutdown ran")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        elif scope["type"] == "http":
            if scope["path"] == "/slow":
                slow_started(slot)
                await asyncio.sleep(SLOW_SECONDS)
            client = scope.get("client") or ("", 0)
            await send_json(send, reply(slot, (client[0], client[1]), state["started"]))
        elif scope["type"] == "websocket":
            await receive()  # websocket.connect
            await send({"type": "websocket.accept"})
            while True:
                message = await receive()
                if message["type"] != "websocket.receive":
                    return
                await send({"type": "websocket.send", "text": json.dumps({"slot": slot, "echo": message["text"]})})

    return ASGIWorker(app, ssl_context=tls_context(), lifespan="on", log_level="warning")


def tornado_worker(slot: int) -> Any:
    from tornado import web, websocket

    from sticky_server.adapters.tornado import TornadoWorker

    class Index(web.RequestHandler):
        async def get(self) -> None:
            if self.request.path == "/slow":
                slow_started(slot)
                await asyncio.sleep(SLOW_SECONDS)
            host, port = self.request.remote_ip or "", 0
            context = getattr(self.request.connection, "context", None)
            if context is not None:
                address = getattr(context, "address", None)  # what TornadoWorker gave handle_stream
                if isinstance(address, tuple):
                    host, port = address[0], address[1]
            self.set_header("Content-Type", "application/json")
            self.write(reply(slot, (host, port), True))

    class Echo(websocket.WebSocketHandler):
        def on_message(self, message: str | bytes) -> None:
            text = message.decode() if isinstance(message, bytes) else message
            self.write_message(json.dumps({"slot": slot, "echo": text}))

    class Stopping(TornadoWorker):
        async def stop(self) -> None:
            await super().stop()
            shutdown_ran(slot, "tornado stopped")

    app = web.Application([(r"/", Index), (r"/slow", Index), (r"/ws", Echo)])
    return Stopping(app, ssl_context=tls_context())


WORKERS = {
    "http": http_worker,
    "wsgi": wsgi_worker,
    "gunicorn": gunicorn_worker,
    "asyncio": asyncio_worker,
    "aiohttp": aiohttp_worker,
    "asgi": asgi_worker,
    "tornado": tornado_worker,
}


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(process)d %(name)s %(levelname)s %(message)s")
    sticky = StickyServer(
        workers=int(os.environ.get("APP_WORKERS", "2")),
        graceful_timeout=float(os.environ.get("APP_GRACEFUL", "15")),
        balancer=os.environ.get("APP_BALANCER", "ip-hash"),
        route_by=os.environ.get("APP_ROUTE_BY") or None,
    )
    if sticky.is_master:
        record_pid("master")
        sticky.on_listening(lambda address: say(f"LISTENING {address[0]} {address[1]}"))
        sticky.listen(0, host="127.0.0.1")
        return
    record_pid(f"worker{sticky.worker_id}")
    slot = sticky.worker_id or 0
    worker = WORKERS[ADAPTER](slot)
    say(f"WORKER {slot} {ADAPTER} ready to serve")
    sticky.work(worker)


if __name__ == "__main__":
    main()
