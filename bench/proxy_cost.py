"""Master CPU per connection: plain IP hash against PROXY protocol v1/v2 and X-Forwarded-For.

    python bench/proxy_cost.py [--connections N] [--rounds R]

This file is both the driver (run by you) and the server it measures (started
with BENCH_ROLE=server: a master and two workers that answer each connection with
one line and close it). For each mode the driver starts a fresh server, makes N
connections from 32 distinct 127.0.0.x addresses (each connection sends the
mode's header and a small request, reads the answer, closes), stops the server,
and reads the master's own CPU time (``getrusage(RUSAGE_SELF)``: its workers are
not counted) from the moment every worker was ready to the end. The modes are
interleaved, R rounds; it prints the median microseconds per connection of each
and the ratio to plain IP hash (the target: under 2x).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

MODES = ("plain", "proxy-v1", "proxy-v2", "forwarded")
SOURCES = [f"127.0.0.{n}" for n in range(2, 34)]
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def run_server() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sticky_server import StickyServer, Worker

    mode = os.environ["BENCH_MODE"]
    sticky = StickyServer(
        workers=2,
        graceful_timeout=5,
        proxy_protocol=mode.startswith("proxy"),
        forwarded_header="x-forwarded-for" if mode == "forwarded" else None,
    )
    if not sticky.is_master:

        class AnswerOnce(Worker):
            def add_connection(self, sock: socket.socket) -> None:
                with sock:
                    sock.recv(4096)
                    sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")

        sticky.work(AnswerOnce())
        return
    started: list[float] = []

    def ready(address: tuple[str, int]) -> None:
        usage = resource.getrusage(resource.RUSAGE_SELF)
        started.append(usage.ru_utime + usage.ru_stime)
        print(f"READY {address[1]}", flush=True)

    sticky.on_listening(ready)
    sticky.listen(0, host="127.0.0.1")
    usage = resource.getrusage(resource.RUSAGE_SELF)
    print(f"CPU {usage.ru_utime + usage.ru_stime - started[0]}", flush=True)


def header(mode: str, source: str, port: int) -> bytes:
    if mode == "proxy-v1":
        return f"PROXY TCP4 {source} 127.0.0.1 {port} 80\r\n".encode()
    if mode == "proxy-v2":
        block = socket.inet_aton(source) + socket.inet_aton("127.0.0.1") + port.to_bytes(2, "big") + b"\x00\x50"
        return b"\r\n\r\n\x00\r\nQUIT\n\x21\x11" + len(block).to_bytes(2, "big") + block
    return b""


def request_for(mode: str, source: str, port: int) -> bytes:
    if mode == "forwarded":
        return REQUEST[:-2] + f"X-Forwarded-For: 203.0.113.{port % 250}\r\n\r\n".encode()
    return header(mode, f"203.0.113.{port % 250}", port) + REQUEST


def load(port: int, mode: str, connections: int, threads: int = 8) -> float:
    """Make ``connections`` connections; return the wall time taken."""
    counter = iter(range(connections))
    lock = threading.Lock()
    errors: list[str] = []

    def client(n: int) -> None:
        source = SOURCES[n % len(SOURCES)]
        while True:
            with lock:
                index = next(counter, None)
            if index is None:
                return
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
                    sock.sendall(request_for(mode, source, index))
                    while sock.recv(4096):
                        pass
            except OSError as exc:
                errors.append(repr(exc))

    began = time.perf_counter()
    workers = [threading.Thread(target=client, args=(n,)) for n in range(threads)]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join()
    if errors:
        raise RuntimeError(f"{len(errors)} connections failed, e.g. {errors[:3]}")
    return time.perf_counter() - began


def measure(mode: str, connections: int) -> tuple[float, float]:
    """Master CPU microseconds per connection, and connections per second, for one fresh server."""
    env = dict(os.environ, BENCH_ROLE="server", BENCH_MODE=mode)
    with tempfile.TemporaryDirectory():
        server = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve())],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        try:
            assert server.stdout is not None
            port = 0
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline:
                line = server.stdout.readline()
                if line.startswith("READY "):
                    port = int(line.split()[1])
                    break
                if not line:
                    break
            if not port:
                raise RuntimeError("the bench server did not start")
            wall = load(port, mode, connections)
            server.send_signal(signal.SIGTERM)
            cpu = None
            for line in server.stdout:
                if line.startswith("CPU "):
                    cpu = float(line.split()[1])
            server.wait(30)
        finally:
            if server.poll() is None:
                server.kill()
                server.wait(10)
    if cpu is None:
        raise RuntimeError("the bench server did not report its CPU time")
    return cpu / connections * 1e6, connections / wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--connections", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {mode: [] for mode in MODES}
    for round_number in range(args.rounds):
        for mode in MODES:
            results[mode].append(measure(mode, args.connections))
            cpu, rate = results[mode][-1]
            print(f"round {round_number + 1} {mode:10} {cpu:6.1f} us/conn master CPU  {rate:7.0f} conn/s", flush=True)
    plain = statistics.median(cpu for cpu, _ in results["plain"])
    print(f"\nmedians of {args.rounds} interleaved rounds, {args.connections} connections each (2 workers):")
    summary = {}
    for mode in MODES:
        cpu = statistics.median(value for value, _ in results[mode])
        rate = statistics.median(value for _, value in results[mode])
        summary[mode] = {"us_per_connection": round(cpu, 2), "ratio_to_plain": round(cpu / plain, 2)}
        verdict = "" if mode == "plain" else ("  (target < 2x: met)" if cpu / plain < 2 else "  (target < 2x: MISSED)")
        print(f"  {mode:10} {cpu:6.1f} us/conn  {cpu / plain:4.2f}x plain  {rate:7.0f} conn/s{verdict}")
    print(json.dumps(summary))


if __name__ == "__main__":
    if os.environ.get("BENCH_ROLE") == "server":
        run_server()
    else:
        main()
