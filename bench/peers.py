"""What a python-socketio user would otherwise run, against sticky_server, on the same app and the same loads.

    python bench/peers.py [--workers N] [--rounds R] [--seconds S] [--stack fast|plain|both] [--chart out.png]

Needs nginx (``apt-get install nginx``; without it that row is skipped, saying so),
wrk (``apt-get install wrk``) and gcc (``bench/client.c``). The app is
``bench/peers_app.py``: python-socketio's ASGI app with a plain ``GET /`` and a
websocket echo on ``/echo``. The servers, fresh for every measurement, interleaved
over R rounds, access logs off in all:

  nginx     nginx (worker_processes auto) with ``hash $remote_addr consistent`` and
            upstream keep-alive in front of N uvicorn processes on their own ports:
            python-socketio's documented deployment for several workers
  nginx-1   the same with ``worker_processes 1``
  uvicorn   ``uvicorn --workers N``: one shared socket, not sticky (it breaks
            socket.io's long polling): the ceiling, not a choice for socket.io
  uvicorn-reuseport  N uvicorn processes, each on a socket of its own bound to the port
            with SO_REUSEPORT (``uvicorn --fd``): not sticky either (the kernel hashes
            each connection's four addresses), but like every sticky server it gives
            each process a queue of its own, so a new connection waits for its process
            even while another is idle. Against ``uvicorn`` it measures what per-process
            queues cost on this machine; against ``sticky``, what stickiness costs
  granian   ``granian --interface asgi --workers N`` (a reference, not sticky either;
            skipped, saying so, when granian is not installed)
  sticky    ``sticky-server bench.peers_app:app --asgi -w N``, as configured by
            default (on Linux the kernel path)
  sticky-master  the same with ``--steering master`` (every connection through the master)
  sticky-session  ``sticky-server ... --route-by engineio`` (routed by session; kernel path)
  sticky-session-master  the same with ``--steering master``

The loads:

  keep-alive    ``wrk -t1 -c32``: requests over 32 kept-alive connections (one
                client address, so the sticky servers put them all on one worker)
  keep-alive-64 the C client's keep-alive mode: 64 kept-alive connections, each from
                its own address (what production looks like)
  new-conn      the C client's closed loop: a new connection per request, 32 in
                flight, from 64 client addresses
  new-conn-250  the same from 250 client addresses
  websocket     32 websockets from 32 client addresses, each sending a message and
                waiting for its echo, over and over (messages/s)

The stacks (``--stack``, default ``fast``): ``fast`` is what the ``[asgi]`` extra
installs and uvicorn and the command pick by themselves (httptools on uvloop), ``plain``
is h11 on asyncio's loop (``--http h11 --loop asyncio`` everywhere; granian has no such
choice and runs in neither); ``both`` runs every server on each.

It prints medians, every server's ratio to nginx and to uvicorn, and with every round
how the work split over the worker processes (each one's share of the CPU time the
workers spent in that load: the closed loops are bound by the busier one). ``--chart
PATH`` also draws the medians side by side as a PNG (needs matplotlib: ``pip install
-e '.[bench]'``).

``--one-address N`` runs another load instead: N socket.io clients (Node's
``socket.io-client``, ``bench/one_address.js``) behind ONE address, one shared
keep-alive agent, connect, upgrade and ask which process serves them: the time until
all are served, and how many sessions each process holds (nginx's
``hash $remote_addr`` and IP hash put them all on one; ``--route-by`` spreads them).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
from connections import build_client, children_of, closed_loop, cpu_seconds  # noqa: E402

HOST = "127.0.0.1"
SERVERS = ("nginx", "nginx-1", "uvicorn", "uvicorn-reuseport", "granian", "sticky", "sticky-master")
LOADS = ("keep-alive", "keep-alive-64", "new-conn", "new-conn-250", "websocket")
GRANIAN = shutil.which("granian") or (
    str(Path(sys.executable).with_name("granian")) if Path(sys.executable).with_name("granian").exists() else None
)
ONE_ADDRESS_SERVERS = ("nginx", "sticky", "sticky-session", "sticky-session-master")
NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
NGINX_CONFIG = """
worker_processes {processes};
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    upstream app {{
        hash $remote_addr consistent;
{servers}
        keepalive 64;
    }}
    map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
    server {{
        listen {host}:{port} backlog=4096;
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Host $host;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
        }}
    }}
}}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def answers(port: int) -> bool:
    try:
        with socket.create_connection((HOST, port), timeout=2) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: b\r\nConnection: close\r\n\r\n")
            return sock.recv(100).startswith(b"HTTP/1.1 200")
    except OSError:
        return False


STACKS = {"fast": ["--http", "httptools", "--loop", "uvloop"], "plain": ["--http", "h11", "--loop", "asyncio"]}


def uvicorn_command(stack: str, *args: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "peers_app:app",
        "--app-dir",
        str(HERE),
        "--no-access-log",
        "--log-level",
        "warning",
        *STACKS[stack],
        *args,
    ]


class Server:
    """One server under test, with every process it started (stopped by pid)."""

    def __init__(self, kind: str, workers: int, stack: str = "fast") -> None:
        self.port = free_port()
        self.kind = kind
        self.processes: list[subprocess.Popen[bytes]] = []
        self.scratch = tempfile.mkdtemp(prefix=f"peers-{kind}-")
        quiet = {"stdin": subprocess.DEVNULL, "stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
        if kind in ("nginx", "nginx-1"):
            assert NGINX is not None
            ports = [free_port() for _ in range(workers)]
            for port in ports:
                command = uvicorn_command(stack, "--port", str(port))
                self.processes.append(subprocess.Popen(command, **quiet))  # type: ignore[call-overload]
            servers = "\n".join(f"        server {HOST}:{port};" for port in ports)
            config = Path(self.scratch, "nginx.conf")
            processes = "1" if kind == "nginx-1" else "auto"
            config.write_text(
                NGINX_CONFIG.format(
                    processes=processes, prefix=self.scratch, servers=servers, host=HOST, port=self.port
                )
            )
            self._wait(ports)
            command = [NGINX, "-p", self.scratch, "-c", str(config), "-g", "daemon off;"]
            self.processes.append(subprocess.Popen(command, **quiet))  # type: ignore[call-overload]
        elif kind == "uvicorn":
            command = uvicorn_command(stack, "--port", str(self.port), "--workers", str(workers))
            self.processes.append(subprocess.Popen(command, **quiet))  # type: ignore[call-overload]
        elif kind == "uvicorn-reuseport":
            for _ in range(workers):
                with socket.socket() as sock:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
                    # uvicorn takes an --fd for a Unix socket and leaves Nagle on: what it accepts
                    # inherits TCP_NODELAY from here instead (else every answer waits 40 ms).
                    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                    sock.bind((HOST, self.port))
                    sock.listen(4096)
                    command = uvicorn_command(stack, "--fd", str(sock.fileno()))
                    self.processes.append(subprocess.Popen(command, pass_fds=(sock.fileno(),), **quiet))  # type: ignore[call-overload]
        elif kind == "granian":
            assert GRANIAN is not None
            command = [GRANIAN, "--interface", "asgi", "--workers", str(workers), "--host", HOST]
            command += ["--port", str(self.port), "--log-level", "warning", "peers_app:app"]
            self.processes.append(subprocess.Popen(command, cwd=HERE, **quiet))  # type: ignore[call-overload]
        else:
            session = ["--route-by", "engineio"] if kind.startswith("sticky-session") else []
            command = [
                sys.executable,
                "-m",
                "sticky_server",
                "peers_app:app",
                "--app-dir",
                str(HERE),
                "--asgi",
                "-w",
                str(workers),
                "-b",
                f"{HOST}:{self.port}",
                "--no-access-log",
                "--log-level",
                "warning",
                "--steering",
                "master" if kind.endswith("master") else "auto",
                *STACKS[stack],
                *session,
            ]
            self.processes.append(subprocess.Popen(command, cwd=REPO, **quiet))  # type: ignore[call-overload]
        self._wait([self.port])
        # Every worker up: a few answers in a row (uvicorn --workers answers once one is).
        time.sleep(1.0)

    def _wait(self, ports: list[int]) -> None:
        deadline = time.monotonic() + 30
        for port in ports:
            while not answers(port):
                if time.monotonic() > deadline or any(process.poll() is not None for process in self.processes):
                    self.stop()
                    raise RuntimeError(f"port {port} does not answer")
                time.sleep(0.1)

    def workers(self) -> list[int]:
        """The processes that run the app: nginx's uvicorns, else the server's children that serve."""
        if self.kind.startswith("nginx"):
            return [process.pid for process in self.processes[:-1]]
        if self.kind == "uvicorn-reuseport":
            return [process.pid for process in self.processes]
        return [pid for pid in children_of(self.processes[-1].pid) if _serves(pid)]

    def stop(self) -> None:
        for process in reversed(self.processes):
            descendants = children_of(process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGTERM if process.args[0] != NGINX else signal.SIGQUIT)
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait(10)
            for pid in descendants:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.scratch, ignore_errors=True)


def _serves(pid: int) -> bool:
    # multiprocessing's resource tracker is a child of uvicorn --workers too.
    try:
        return b"resource_tracker" not in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


class Split:
    """Each worker process's share of the CPU time the workers spent between ``__init__`` and ``shares``."""

    def __init__(self, server: Server) -> None:
        self.pids = server.workers()
        self.before = [cpu_seconds(pid) for pid in self.pids]

    def shares(self) -> list[float]:
        spent = [cpu_seconds(pid) - before for pid, before in zip(self.pids, self.before, strict=True)]
        total = sum(spent) or 1.0
        return sorted((share / total for share in spent), reverse=True)


def measured(server: Server, load: Callable[[], float]) -> tuple[float, list[float]]:
    split = Split(server)
    return load(), split.shares()


class _Endpoint:
    """What ``closed_loop`` needs of a server."""

    def __init__(self, server: Server) -> None:
        self.port = server.port
        self.proxy = False
        self.process = server.processes[-1]

    def processes(self) -> list[int]:
        return [self.process.pid]


def c_client(port: int, mode: str, concurrency: int, seconds: int, sources: int) -> float:
    """The C client (``bench/client.c``) in ``mode`` (closed, keepalive): answers per second."""
    command = [str(build_client()), HOST, str(port), mode, str(concurrency), str(seconds), str(sources), "0"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=seconds + 30, check=True)
    done = result.stdout.strip().splitlines()[-1].split()
    ok, errors, elapsed = int(done[1]), int(done[2]), float(done[3])
    if errors > ok // 100:
        raise RuntimeError(f"{mode} from {sources} addresses: {errors} errors against {ok} answers")
    return ok / elapsed


def keep_alive(port: int, seconds: int) -> float:
    result = subprocess.run(
        ["wrk", "-t1", "-c32", f"-d{seconds}s", f"http://{HOST}:{port}/"],
        capture_output=True,
        text=True,
        timeout=seconds + 30,
        check=True,
    )
    found = re.search(r"Requests/sec:\s+([\d.]+)", result.stdout)
    assert found, result.stdout
    return float(found.group(1))


async def _echo_client(port: int, source: str, until: float, counts: list[int]) -> None:
    reader, writer = await asyncio.open_connection(HOST, port, local_addr=(source, 0))
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /echo HTTP/1.1\r\nHost: {HOST}:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n"
        ).encode()
    )
    head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 101"), head[:100]
    payload = b"hello, echo"
    mask = os.urandom(4)
    masked = bytes(byte ^ mask[index % 4] for index, byte in enumerate(payload))
    frame = struct.pack("!BB", 0x81, 0x80 | len(payload)) + mask + masked
    sent = 0
    while time.monotonic() < until:
        writer.write(frame)
        first, length = await reader.readexactly(2)
        await reader.readexactly(length & 0x7F)
        assert first == 0x81
        sent += 1
    counts.append(sent)
    writer.write(struct.pack("!BB", 0x88, 0x80) + mask)
    writer.close()


def websocket_echo(port: int, seconds: int, clients: int = 32) -> float:
    async def run() -> float:
        counts: list[int] = []
        started = time.monotonic()
        until = started + seconds
        await asyncio.gather(*(_echo_client(port, f"127.0.0.{2 + n}", until, counts) for n in range(clients)))
        return sum(counts) / (time.monotonic() - started)

    return asyncio.run(run())


def one_address(port: int, count: int) -> tuple[float, list[int], int]:
    """``bench/one_address.js``: milliseconds until ``count`` clients behind one address are served, the
    sessions per process (largest first), and the clients that failed."""
    node_path = REPO / "tests" / "node" / "node_modules"
    done = subprocess.run(
        ["node", str(HERE / "one_address.js"), f"http://{HOST}:{port}", "127.0.0.2", str(count)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={**os.environ, "NODE_PATH": str(node_path)},
    )
    result = json.loads(done.stdout)
    return float(result["ms"]), sorted(result["perPid"].values(), reverse=True), int(result["errors"])


def one_address_rounds(servers: list[str], workers: int, rounds: int, count: int) -> None:
    times: dict[str, list[float]] = {name: [] for name in servers}
    print(f"{workers} workers, {rounds} rounds: {count} socket.io clients behind one address", flush=True)
    for round_ in range(rounds):
        for name in servers:
            server = Server(name, workers)
            try:
                ms, split, errors = one_address(server.port, count)
            finally:
                server.stop()
            times[name].append(ms)
            print(f"  round {round_ + 1} {name:<22} {ms:7.0f} ms  sessions per process {split}  errors {errors}")
    print()
    for name, values in times.items():
        print(f"{name:<22} median {statistics.median(values):7.0f} ms until all {count} are served")


def run_loads(server: Server, seconds: int) -> dict[str, tuple[float, list[float]]]:
    """Every load against ``server``: answers (or messages) per second, and the workers' CPU split."""
    keep_alive(server.port, 1)  # warm-up
    port = server.port
    return {
        "keep-alive": measured(server, lambda: keep_alive(port, seconds)),
        "keep-alive-64": measured(server, lambda: c_client(port, "keepalive", 64, seconds, 64)),
        "new-conn": measured(server, lambda: closed_loop(_Endpoint(server), 32, seconds)["rate"]),  # type: ignore[arg-type]
        "new-conn-250": measured(server, lambda: c_client(port, "closed", 32, seconds, 250)),
        "websocket": measured(server, lambda: websocket_echo(port, seconds)),
    }


def row_name(name: str, stack: str) -> str:
    return name if stack == "fast" else f"{name} (plain)"


COLOURS = {
    "nginx": "#9e9e9e",
    "nginx-1": "#c8c8c8",
    "uvicorn": "#4c72b0",
    "uvicorn-reuseport": "#8fb0dd",
    "granian": "#8172b3",
    "sticky": "#dd8452",
    "sticky-master": "#f2b98f",
}


def chart(path: str, median: dict[str, dict[str, float]], title: str) -> None:
    """The medians side by side: a panel per stack, a group of bars per load (matplotlib, the bench extra)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("--chart needs matplotlib: pip install -e '.[bench]'") from None
    stacks = [stack for stack in ("fast", "plain") if any(row_stack(row) == stack for row in median)]
    figure, panels = plt.subplots(len(stacks), 1, figsize=(11, 4.6 * len(stacks)), dpi=110, squeeze=False)
    for panel, stack in zip(panels[:, 0], stacks, strict=True):
        rows = [row for row in median if row_stack(row) == stack]
        width = 0.84 / len(rows)
        for index, row in enumerate(rows):
            name = row.split(" ")[0]
            offsets = [load + (index - (len(rows) - 1) / 2) * width for load in range(len(LOADS))]
            values = [median[row][load] / 1000 for load in LOADS]
            bold = name.startswith("sticky")
            panel.bar(offsets, values, width, label=name, color=COLOURS.get(name), edgecolor="black" if bold else None)
        panel.set_xticks(range(len(LOADS)), [f"{load}\n({UNITS[load]})" for load in LOADS])
        panel.set_ylabel("thousands per second")
        panel.set_title(f"{STACK_NAMES[stack]}" if len(stacks) > 1 else title, fontsize=10)
        panel.legend(fontsize=8, ncol=2)
        panel.grid(axis="y", alpha=0.3)
    if len(stacks) > 1:
        figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path)
    print(f"chart: {path}")


def row_stack(row: str) -> str:
    return "plain" if row.endswith("(plain)") else "fast"


STACK_NAMES = {
    "fast": "fast stack: httptools on uvloop (what [asgi] installs; granian as it comes)",
    "plain": "plain stack: h11 on asyncio's loop (--http h11 --loop asyncio)",
}


UNITS = {
    "keep-alive": "req/s, 1 address",
    "keep-alive-64": "req/s, 64 addresses",
    "new-conn": "conn/s, 64 addresses",
    "new-conn-250": "conn/s, 250 addresses",
    "websocket": "msg/s",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=int, default=5)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--stack", choices=["fast", "plain", "both"], default="fast")
    parser.add_argument("--chart", metavar="PATH", help="also draw the medians as a PNG (needs matplotlib)")
    parser.add_argument("--one-address", type=int, metavar="N", help="instead: N socket.io clients behind one address")
    args = parser.parse_args()
    if args.one_address:
        servers = args.servers.split(",") if args.servers != ",".join(SERVERS) else list(ONE_ADDRESS_SERVERS)
        if "nginx" in servers and NGINX is None:
            servers.remove("nginx")
        one_address_rounds(servers, args.workers, args.rounds, args.one_address)
        return
    if args.chart and importlib.util.find_spec("matplotlib") is None:
        raise SystemExit("--chart needs matplotlib: pip install -e '.[bench]'")
    build_client()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found: apt-get install wrk")
    servers = [name for name in args.servers.split(",") if name]
    for name, program, how in (
        ("nginx", NGINX, "apt-get install nginx"),
        ("nginx-1", NGINX, "apt-get install nginx"),
        ("granian", GRANIAN, "pip install granian"),
    ):
        if name in servers and program is None:
            print(f"{name}: skipped (not found: {how})")
            servers.remove(name)
    stacks = ["fast", "plain"] if args.stack == "both" else [args.stack]
    # granian has no h11 / asyncio choice: it is measured as it comes, once.
    runs = [(name, stack) for stack in stacks for name in servers if name != "granian" or stack == stacks[0]]
    results: dict[str, dict[str, list[float]]] = {row_name(*run): {load: [] for load in LOADS} for run in runs}
    print(f"{args.workers} workers, {args.rounds} rounds of {args.seconds} s per load, stack {args.stack}", flush=True)
    print("each figure: per second, then each worker's share of the workers' CPU in that load", flush=True)
    for round_ in range(args.rounds):
        for name, stack in runs:
            server = Server(name, args.workers, "fast" if name == "granian" else stack)
            try:
                figures = run_loads(server, args.seconds)
            finally:
                server.stop()
            row = row_name(name, stack)
            for load, (value, _) in figures.items():
                results[row][load].append(value)
            print(
                f"  round {round_ + 1} {row:<22} "
                + "  ".join(
                    f"{load} {value:7.0f} ({'/'.join(f'{share * 100:.0f}' for share in split)})"
                    for load, (value, split) in figures.items()
                ),
                flush=True,
            )
    median = {row: {load: statistics.median(values) for load, values in by.items()} for row, by in results.items()}
    print()
    print(f"{'medians':<22}" + "".join(f"{load:>15}" for load in LOADS))
    for row, by in median.items():
        print(f"{row:<22}" + "".join(f"{by[load]:>13.0f}/s" for load in LOADS))
    for stack in stacks:
        for name in ("sticky", "sticky-master"):
            for base in ("nginx", "nginx-1", "uvicorn", "uvicorn-reuseport", "granian"):
                ours, theirs = row_name(name, stack), row_name(base, stack if base != "granian" else stacks[0])
                if ours in median and theirs in median:
                    ratios = ", ".join(f"{load} {median[ours][load] / median[theirs][load]:.2f}x" for load in LOADS)
                    print(f"{ours} vs {theirs}: {ratios}")
    if args.chart:
        title = f"one python-socketio ASGI app, {args.workers} worker processes, {platform_line()}"
        chart(args.chart, median, title)


def platform_line() -> str:
    return f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"


if __name__ == "__main__":
    main()
