"""Channel throughput: messages per second master -> worker and worker -> worker,
measured while connections are being handed off.

    python bench/messages.py [--messages N] [--switch-interval SECONDS]

This file is both the benchmark driver (run by you) and the server it measures
(the driver starts it with BENCH_ROLE=server: a master and two workers). While a
thread of the server's master sends N small messages to worker 0 as fast as it can,
and then worker 0 publishes N small messages (from a thread, so that its loop keeps
taking connections) that worker 1 counts, the driver keeps opening connections from
distinct 127.0.0.x addresses (each answered and closed by worker 1), so the
messages share the master and the control sockets with hand-offs. It prints both
rates, the ratio to the 50,000 messages/s target, the master's CPU per message, and
how many connections were handed off meanwhile and how long they took."""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Any

TARGET = 50_000


def run_server() -> None:
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from sticky_server import StickyServer, Worker

    count = int(os.environ["BENCH_MESSAGES"])
    switch_interval = os.environ.get("BENCH_SWITCH_INTERVAL")
    if switch_interval:  # in the master and (inherited) in every worker
        sys.setswitchinterval(float(switch_interval))
    sticky = StickyServer(workers=2, graceful_timeout=5)

    if not sticky.is_master:

        class CountingWorker(Worker):
            def __init__(self) -> None:
                self.received = 0

            def publish(self, count: int) -> None:
                for n in range(count):
                    sticky.publish(n)
                    if n % 500 == 499:
                        time.sleep(0)  # let the worker's loop thread have the GIL now and then

            def add_connection(self, sock: socket.socket) -> None:
                sock.close()  # the cheapest possible answer: only hand-offs matter here

            def on_message(self, sender: int | None, message: Any) -> None:
                if sender is None and isinstance(message, dict) and "publish" in message:
                    # From a thread of its own, as an app would from a background task: a
                    # loop in this handler would hold up the worker's hand-offs until done.
                    threading.Thread(target=self.publish, args=(message["publish"],)).start()
                    return
                self.received += 1
                if self.received == count:
                    sticky.send({"done": count})
                    self.received = 0

        worker = CountingWorker()
        sticky.on_message(worker.on_message)
        sticky.work(worker)
        return

    done = threading.Event()
    sticky.on_message(lambda worker_id, message: done.set() if isinstance(message, dict) else None)

    def measure(address: tuple[str, int]) -> None:
        print("READY", address[1], flush=True)
        time.sleep(1.0)  # let the driver's connection load get going
        started, cpu = time.perf_counter(), time.process_time()
        for n in range(count):
            sticky.send(n, to=0)
        done.wait()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"RESULT master->worker {count} {seconds:.6f} {cpu:.6f}", flush=True)
        done.clear()
        started, cpu = time.perf_counter(), time.process_time()
        sticky.send({"publish": count}, to=0)
        done.wait()
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
        print(f"RESULT worker->worker {count} {seconds:.6f} {cpu:.6f}", flush=True)

    sticky.on_listening(lambda address: threading.Thread(target=measure, args=(address,), daemon=True).start())
    profile = os.environ.get("BENCH_PROFILE")  # a file for the master's cProfile statistics
    if profile:
        import cProfile

        cProfile.runctx('sticky.listen(0, host="127.0.0.1")', globals(), locals(), profile)
    else:
        sticky.listen(0, host="127.0.0.1")


def percentiles(latencies: list[float]) -> str:
    if not latencies:
        return "(none)"
    ordered = sorted(latencies)
    return (
        f"p50 {ordered[len(ordered) // 2] * 1000:.1f} ms, "
        f"p99 {ordered[min(len(ordered) - 1, len(ordered) * 99 // 100)] * 1000:.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=200_000, help="messages per direction (default 200000)")
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval() in the server processes (default: Python's, 0.005 s); see README, Messages",
    )
    args = parser.parse_args()
    env = dict(os.environ, BENCH_ROLE="server", BENCH_MESSAGES=str(args.messages), PYTHONUNBUFFERED="1")
    if args.switch_interval:
        env["BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    server = subprocess.Popen(
        [sys.executable, os.path.abspath(__file__)],
        env=env,
        stdout=subprocess.PIPE,
        text=True,
        stderr=subprocess.DEVNULL,
    )
    stop = threading.Event()
    latencies: list[float] = []  # of each connection: connect until the worker closes it

    def connect_loop(port: int, n: int) -> None:
        source = f"127.0.0.{2 + n}"
        while not stop.is_set():
            started = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0)) as sock:
                    sock.recv(1)
                latencies.append(time.perf_counter() - started)
            except OSError:
                pass

    try:
        assert server.stdout is not None
        line = server.stdout.readline()
        if not line.startswith("READY"):
            raise SystemExit(f"the bench server did not start (said {line!r})")
        port = int(line.split()[1])
        loaders = [threading.Thread(target=connect_loop, args=(port, n), daemon=True) for n in range(2)]
        for loader in loaders:
            loader.start()
        interval = args.switch_interval or sys.getswitchinterval()
        print(
            f"sticky_server channel benchmark: {args.messages} small messages per direction, 2 workers, "
            f"switch interval {interval * 1000:g} ms"
        )
        time.sleep(0.5)
        quiet = latencies[:]
        print(f"  before any message: connections take {percentiles(quiet)} (connect until closed by the worker)")
        for _ in range(2):
            before = len(latencies)
            line = server.stdout.readline()
            if not line.startswith("RESULT"):
                raise SystemExit(f"the bench server stopped early (said {line!r})")
            _, direction, count, seconds, cpu = line.split()
            rate = int(count) / float(seconds)
            master_us = float(cpu) / int(count) * 1e6
            during = latencies[before:]
            print(
                f"  {direction:15} {rate:10,.0f} messages/s  ({rate / TARGET:.2f}x the {TARGET:,}/s target; "
                f"master CPU {master_us:.1f} us/message; {len(during):,} connections handed off meanwhile, "
                f"taking {percentiles(during)})"
            )
    finally:
        stop.set()
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


if __name__ == "__main__":
    if os.environ.get("BENCH_ROLE") == "server":
        run_server()
    else:
        main()
