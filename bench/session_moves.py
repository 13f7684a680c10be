"""What moving a connection costs: the latency of a request whose session lives on another worker than the one
the kernel chose, against one that stays, with ``route_by="engineio"``.

    python bench/session_moves.py [--requests N] [--rounds R]

Two workers; a trivial server answers every request. From one client address, a new
connection per request, in turn: requests naming a session of the worker IP hash puts
that address on (kept where they are accepted) and of the other worker (on the kernel
path the worker passes them to the master, which hands them over: a move). The same
on the master path, where nothing moves (the master reads every head). Prints p50
and p99 of connect-to-answer, in microseconds, per case, medians over R rounds.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

from connections import answer  # noqa: E402

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet  # noqa: E402

SOURCE = "127.0.0.2"


def serve(port: int, steering: str) -> None:
    from sticky_server import StickyServer

    class Answer:
        def add_connection(self, conn: socket.socket) -> None:
            answer(conn)  # bench/connections.py's trivial job

    sticky = StickyServer(workers=2, route_by="engineio", steering=steering, graceful_timeout=2)
    if sticky.is_master:
        sticky.on_listening(lambda address: print("READY", flush=True))
        sticky.listen(port, host="127.0.0.1")
    else:
        sticky.work(Answer())


def latencies(port: int, slot: int, requests: int) -> list[float]:
    request = f"GET /socket.io/?EIO=4&transport=polling&sid={slot}.bench HTTP/1.1\r\nHost: b\r\n\r\n".encode()
    times = []
    for _ in range(requests):
        started = time.perf_counter()
        with socket.create_connection(("127.0.0.1", port), source_address=(SOURCE, 0)) as sock:
            sock.sendall(request)
            while sock.recv(4096):
                pass
        times.append((time.perf_counter() - started) * 1e6)
    return times


def run(steering: str, requests: int) -> dict[str, tuple[float, float]]:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = {**os.environ, "BENCH_MOVES_ROLE": steering, "BENCH_MOVES_PORT": str(port)}
    server = subprocess.Popen([sys.executable, __file__], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert server.stdout is not None and server.stdout.readline().strip() == b"READY"
        time.sleep(0.5)
        home = IPHashBalancer().pick(ClientInfo(SOURCE, 0), WorkerSet(2, (0, 1)))
        latencies(port, home, 50)  # warm-up
        kept = latencies(port, home, requests)
        moved = latencies(port, 1 - home, requests)
    finally:
        server.terminate()
        server.wait(10)
    quantiles = statistics.quantiles
    return {
        "its own worker's": (statistics.median(kept), quantiles(kept, n=100)[98]),
        "the other worker's": (statistics.median(moved), quantiles(moved, n=100)[98]),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    results: dict[tuple[str, str], list[tuple[float, float]]] = {}
    for _ in range(args.rounds):
        for steering in ("kernel", "master"):
            for case, figures in run(steering, args.requests).items():
                results.setdefault((steering, case), []).append(figures)
    print(f"{args.requests} requests per case, {args.rounds} rounds, a new connection each, from {SOURCE}")
    print(f"{'path':<8} {'session of':<20} {'p50 us':>8} {'p99 us':>8}")
    for (steering, case), rounds in results.items():
        p50 = statistics.median(r[0] for r in rounds)
        p99 = statistics.median(r[1] for r in rounds)
        print(f"{steering:<8} {case:<20} {p50:8.0f} {p99:8.0f}")


if __name__ == "__main__":
    role = os.environ.get("BENCH_MOVES_ROLE")
    if role:
        serve(int(os.environ["BENCH_MOVES_PORT"]), role)
    else:
        main()
