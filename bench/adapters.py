"""Requests per second through each adapter: the sticky master with one worker against the framework alone.

    python bench/adapters.py [--adapters http,aiohttp,...] [--rounds R] [--seconds S] [--connections C]

Every adapter on an event loop is measured on both stacks, each against the framework
alone on the same stack: the fast one its extra installs (``asgi``: uvicorn with httptools
on uvloop; ``aiohttp``, ``tornado``, ``asyncio``: on uvloop) and the plain one
(``asgi-plain``: h11 on asyncio's loop; ``aiohttp-plain``, ``tornado-plain``,
``asyncio-plain``: asyncio's loop), what ``--http h11 --loop asyncio`` gives.

Needs ``wrk`` (Debian: ``apt-get install wrk``) and the frameworks (``pip install -e '.[test]'``).

This file is both the driver and the servers it measures (started with
BENCH_ROLE=direct|sticky and BENCH_ADAPTER). For every adapter, two servers answer
``GET /`` with a fixed 13-byte body over keep-alive connections:

- direct: the framework serving its own listening socket in one process (its
  usual way: ``serve_forever``, ``asyncio.start_server``, ``web.run_app``,
  ``uvicorn.run``, ``app.listen``; for the WSGI worker on gunicorn's parser, gunicorn
  itself with one gthread worker);
- sticky: a sticky_server master with one worker running the adapter.

``wrk`` keeps C connections open for S seconds against each, interleaved, R
rounds, then one connection for 2 s; the driver prints the median requests/s of
each, the ratio sticky/direct, the p99 latency under load and the p50 latency of
the single connection (where a Nagle-class stall shows as ~40 ms). Once a
connection is handed off the master is out of the data path, so the target is a
ratio of at least 0.95. (wsgiref closes every
connection after one answer, so its figure includes a new connection per
request, through the master.)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, NamedTuple

ON_A_LOOP = ("asyncio", "aiohttp", "asgi", "tornado")
ADAPTERS = ("http", "wsgi", "gunicorn", *ON_A_LOOP, *(f"{name}-plain" for name in ON_A_LOOP))
# What an adapter on a loop runs on, the same on both sides: the fast stack where its extra
# installs it (uvloop; httptools for uvicorn), and the plain one (asyncio's loop; h11).
BODY = b"Hello, world!"
HOST = "127.0.0.1"


# --- the servers -------------------------------------------------------------------


class HelloHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(BODY)))
        self.end_headers()
        self.wfile.write(BODY)

    def log_message(self, format: str, *args: Any) -> None:
        pass


def wsgi_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Length", str(len(BODY)))])
    return [BODY]


async def stream_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    response = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(BODY), BODY)
    try:
        while True:
            await reader.readuntil(b"\r\n\r\n")
            writer.write(response)
            await writer.drain()
    except (asyncio.IncompleteReadError, ConnectionError):
        pass
    finally:
        writer.close()


def aiohttp_app() -> Any:
    from aiohttp import web

    async def hello(request: web.Request) -> web.Response:
        return web.Response(body=BODY)

    app = web.Application()
    app.router.add_get("/", hello)
    return app


async def asgi_app(scope: dict[str, Any], receive: Any, send: Any) -> None:
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"13")]})
        await send({"type": "http.response.body", "body": BODY})


def tornado_app() -> Any:
    from tornado import web

    class Hello(web.RequestHandler):
        def get(self) -> None:
            self.write(BODY)

    return web.Application([(r"/", Hello)])


def stack(adapter: str) -> tuple[str, str]:
    """``(framework, loop)``: ``("asgi", "uvloop")`` for ``asgi``, ``("asgi", "asyncio")`` for ``asgi-plain``."""
    framework, plain, _ = adapter.partition("-plain")
    return framework, "asyncio" if plain else "uvloop"


def run_loop(main: Any, loop: str) -> None:
    if loop == "uvloop":
        import uvloop

        uvloop.run(main)
    else:
        asyncio.run(main)


def serve_direct(adapter: str, port: int) -> None:
    print("READY", flush=True)
    adapter, loop = stack(adapter)
    if adapter == "http":
        ThreadingHTTPServer((HOST, port), HelloHandler).serve_forever()
    elif adapter == "wsgi":
        import socketserver
        from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

        class Quiet(WSGIRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                pass

        class Threading(socketserver.ThreadingMixIn, WSGIServer):
            daemon_threads = True

        make_server(HOST, port, wsgi_app, server_class=Threading, handler_class=Quiet).serve_forever()
    elif adapter == "gunicorn":
        serve_gunicorn(port)
    elif adapter == "asyncio":

        async def main() -> None:
            server = await asyncio.start_server(stream_handler, HOST, port)
            await server.serve_forever()

        run_loop(main(), loop)
    elif adapter == "aiohttp":
        from aiohttp import web

        async def serve_aiohttp() -> None:
            runner = web.AppRunner(aiohttp_app(), access_log=None)
            await runner.setup()
            await web.TCPSite(runner, HOST, port).start()
            await asyncio.Event().wait()

        run_loop(serve_aiohttp(), loop)
    elif adapter == "asgi":
        import uvicorn

        http = "httptools" if loop == "uvloop" else "h11"
        uvicorn.run(asgi_app, host=HOST, port=port, log_level="warning", access_log=False, http=http, loop=loop)
    elif adapter == "tornado":

        async def serve_tornado() -> None:
            tornado_app().listen(port, HOST)
            await asyncio.Event().wait()

        run_loop(serve_tornado(), loop)


def serve_gunicorn(port: int) -> None:
    """gunicorn itself, its threaded worker: one worker process, a thread for each of wrk's connections."""
    from gunicorn.app.base import BaseApplication

    class Gunicorn(BaseApplication):  # type: ignore[misc]
        def load_config(self) -> None:
            options = {"bind": f"{HOST}:{port}", "workers": 1, "worker_class": "gthread", "threads": 64}
            for name, value in {**options, "keepalive": 5, "loglevel": "warning"}.items():
                self.cfg.set(name, value)

        def load(self) -> Any:
            return wsgi_app

    Gunicorn().run()


def sticky_worker(adapter: str) -> Any:
    adapter, loop = stack(adapter)
    if adapter == "http":
        from sticky_server.adapters.stdlib import HTTPWorker

        return HTTPWorker(HelloHandler)
    if adapter == "wsgi":
        from sticky_server.adapters.stdlib import WSGIWorker

        return WSGIWorker(wsgi_app)
    if adapter == "gunicorn":
        from sticky_server.adapters.wsgi import WSGIWorker as GunicornWSGIWorker

        return GunicornWSGIWorker(wsgi_app, access_log=False)
    if adapter == "asyncio":
        from sticky_server.adapters.asyncio import AsyncioWorker

        return AsyncioWorker(client_connected=stream_handler)
    if adapter == "aiohttp":
        from sticky_server.adapters.aiohttp import AiohttpWorker

        return AiohttpWorker(aiohttp_app(), access_log=None)
    if adapter == "asgi":
        from sticky_server.adapters.asgi import ASGIWorker

        http = "httptools" if loop == "uvloop" else "h11"
        return ASGIWorker(asgi_app, log_level="warning", access_log=False, http=http)
    from sticky_server.adapters.tornado import TornadoWorker

    return TornadoWorker(tornado_app())


def serve_sticky(adapter: str, port: int) -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sticky_server import StickyServer

    # loop="auto" would pick uvloop by itself (the fast rows); named here so both rows say what they run.
    sticky = StickyServer(workers=1, graceful_timeout=5, loop=stack(adapter)[1])
    if sticky.is_master:
        sticky.on_listening(lambda address: print("READY", flush=True))
        sticky.listen(port, host=HOST)
    else:
        sticky.work(sticky_worker(adapter))


# --- the driver --------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def start(role: str, adapter: str, port: int) -> subprocess.Popen[bytes]:
    env = dict(os.environ, BENCH_ROLE=role, BENCH_ADAPTER=adapter, BENCH_PORT=str(port), PYTHONUNBUFFERED="1")
    process = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,  # wrk resets its connections at the end: servers log tracebacks
    )
    assert process.stdout is not None
    line = process.stdout.readline()
    if line.strip() != b"READY":
        stop(process)
        raise RuntimeError(f"the {role} {adapter} server did not start: {line!r}")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:  # READY is printed just before the direct servers listen
        try:
            socket.create_connection((HOST, port), timeout=1).close()
            return process
        except OSError:
            time.sleep(0.05)
    stop(process)
    raise RuntimeError(f"the {role} {adapter} server is not listening on {port}")


def stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(5)


class Run(NamedTuple):
    """One wrk run: requests/s and latency percentiles in microseconds."""

    rate: float
    p50: float
    p99: float


_UNITS = {"us": 1.0, "ms": 1000.0, "s": 1_000_000.0}


def _latency(output: str, percent: int) -> float:
    match = re.search(rf"^\s+{percent}%\s+([\d.]+)(us|ms|s)\s*$", output, re.MULTILINE)
    if match is None:
        raise RuntimeError(f"wrk printed no {percent}% latency:\n{output}")
    return float(match.group(1)) * _UNITS[match.group(2)]


def wrk(port: int, seconds: int, connections: int) -> Run:
    result = subprocess.run(
        ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://{HOST}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    match = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    if match is None:
        raise RuntimeError(f"wrk printed no rate:\n{result.stdout}\n{result.stderr}")
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)|Socket errors: (.*)", result.stdout)
    if errors:
        print(f"    wrk reported: {errors.group(0)}", flush=True)
    return Run(float(match.group(1)), _latency(result.stdout, 50), _latency(result.stdout, 99))


def measure(adapter: str, role: str, seconds: int, connections: int) -> tuple[Run, Run]:
    """The loaded run (``connections`` at once) and a one-connection run, whose latency shows stalls
    (Nagle meeting a delayed ACK costs 40 ms per response there, and hides in a loaded rate)."""
    port = free_port()
    process = start(role, adapter, port)
    try:
        wrk(port, 1, connections)  # warm-up
        return wrk(port, seconds, connections), wrk(port, 2, 1)
    finally:
        stop(process)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--adapters", default=",".join(ADAPTERS))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    if shutil.which("wrk") is None:
        sys.exit("this benchmark needs wrk: apt-get install wrk")
    adapters = [name for name in args.adapters.split(",") if name]
    unknown = set(adapters) - set(ADAPTERS)
    if unknown:
        parser.error(f"unknown adapter(s) {sorted(unknown)}; choose from {', '.join(ADAPTERS)}")
    print(f"{args.rounds} rounds, {args.seconds} s each, {args.connections} keep-alive connections, wrk -t1")
    print("latency: p99 under that load, and p50 over one connection (2 s), direct/sticky, in ms")
    print(
        f"{'adapter':<14} {'direct req/s':>13} {'sticky req/s':>13} {'ratio':>7} {'p99 ms':>13} {'1-conn p50 ms':>15}"
        "   rounds (direct/sticky req/s)"
    )
    for adapter in adapters:
        direct: list[tuple[Run, Run]] = []
        sticky: list[tuple[Run, Run]] = []
        for _ in range(args.rounds):
            direct.append(measure(adapter, "direct", args.seconds, args.connections))
            sticky.append(measure(adapter, "sticky", args.seconds, args.connections))
        d, s = (statistics.median(run.rate for run, _ in side) for side in (direct, sticky))
        d99, s99 = (statistics.median(run.p99 for run, _ in side) / 1000 for side in (direct, sticky))
        d50, s50 = (statistics.median(one.p50 for _, one in side) / 1000 for side in (direct, sticky))
        rounds = " ".join(f"{a.rate:.0f}/{b.rate:.0f}" for (a, _), (b, _) in zip(direct, sticky, strict=True))
        print(
            f"{adapter:<14} {d:>13.0f} {s:>13.0f} {s / d:>7.3f} {d99:>6.2f}/{s99:<6.2f} {d50:>7.3f}/{s50:<7.3f}"
            f"   {rounds}",
            flush=True,
        )


if __name__ == "__main__":
    role = os.environ.get("BENCH_ROLE")
    if role == "direct":
        serve_direct(os.environ["BENCH_ADAPTER"], int(os.environ["BENCH_PORT"]))
    elif role == "sticky":
        serve_sticky(os.environ["BENCH_ADAPTER"], int(os.environ["BENCH_PORT"]))
    else:
        main()
