"""Django Channels' group_send across workers: the sticky layer against channels-redis, side by side in one run.

    python bench/group_send.py [--messages N] [--subscribers N] [--workers N] [--rounds N]

Each run is a sticky-server of ``--workers`` workers (default 4). Every worker makes
``--subscribers`` channels (default 250), adds them all to one group and receives on
each; worker 0 then calls ``group_send`` ``--messages`` times (default 500) as fast as
it can, each message stamped with the time it was sent. The time until every
subscriber on every worker has every message gives the rate (group_sends per second,
and deliveries per second: that times the subscribers), and each delivery's delay
gives p50 / p99: flooded (how fast it goes), then paced at ``--paced`` group_sends a
second (default 20, which both keep up with: each message's own delay). The same
runs with ``StickyChannelLayer`` and with channels-redis's ``RedisChannelLayer`` on a
redis-server started for the run on this machine (``redis-server`` on the PATH;
``pip install channels-redis``). Rounds alternate.

This file is also the server it measures (BENCH_ROLE=server, BENCH_LAYER=sticky|redis).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import time
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
GROUP = "bench"


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


def make_layer(kind: str, capacity: int) -> Any:
    if kind == "redis":
        from channels_redis.core import RedisChannelLayer

        return RedisChannelLayer(hosts=[os.environ["BENCH_REDIS"]], capacity=capacity)
    from sticky_server.adapters.channels import StickyChannelLayer

    return StickyChannelLayer(capacity=capacity)


def run_server() -> None:
    sys.path.insert(0, os.path.dirname(HERE))
    from django.conf import settings

    settings.configure()
    from sticky_server import AsyncWorker, StickyServer

    workers = int(os.environ["BENCH_WORKERS"])
    subscribers = int(os.environ["BENCH_SUBSCRIBERS"])
    messages = int(os.environ["BENCH_MESSAGES"])
    kind = os.environ["BENCH_LAYER"]
    rate = float(os.environ.get("BENCH_RATE", "0"))
    sticky = StickyServer(workers=workers, graceful_timeout=5)

    if sticky.is_master:
        ready: set[int] = set()
        results: dict[int, Any] = {}

        @sticky.on_message
        def heard(worker: int, message: Any) -> None:
            if message == "ready":
                ready.add(worker)
                if len(ready) == workers:
                    sticky.broadcast("go")
            elif isinstance(message, dict):
                results[worker] = message
                if len(results) == workers:
                    delays = [delay for result in results.values() for delay in result["delays"]]
                    first = min(result["first_sent"] for result in results.values())
                    last = max(result["last_received"] for result in results.values())
                    say("RESULT " + json.dumps({"seconds": last - first, "delays": delays}))

        sticky.on_listening(lambda address: say("LISTENING"))
        sticky.listen(0, host="127.0.0.1")
        return

    class Bench(AsyncWorker):
        async def start(self) -> None:
            self.layer = make_layer(kind, capacity=messages + 10)
            self.delays: list[float] = []
            self.last_received = 0.0
            self.first_sent = float("inf")
            channels = [await self.layer.new_channel() for _ in range(subscribers)]
            for channel in channels:
                await self.layer.group_add(GROUP, channel)
            self.receivers = [asyncio.create_task(self.receive(channel)) for channel in channels]
            self.done = 0
            sticky.on_message(self.heard)
            await asyncio.sleep(0.5)  # every group_add is in (channels-redis: in Redis)
            sticky.send("ready")

        async def receive(self, channel: str) -> None:
            for _ in range(messages):
                message = await self.layer.receive(channel)
                now = time.time()
                self.delays.append(now - message["sent"])
                self.first_sent = min(self.first_sent, message["sent"])
                self.last_received = now
            self.done += 1
            if self.done == subscribers:
                step = max(1, len(self.delays) // 5000)  # a sample is enough for percentiles
                sticky.send(
                    {
                        "delays": self.delays[::step],
                        "first_sent": self.first_sent,
                        "last_received": self.last_received,
                    }
                )

        def heard(self, sender: int | None, message: Any) -> None:
            if message == "go" and sticky.worker_id == 0:
                asyncio.get_running_loop().create_task(self.send_all())

        async def send_all(self) -> None:
            began = time.monotonic()
            for n in range(messages):
                if rate:  # paced: the delay of each message, not of a queue behind a flood
                    await asyncio.sleep(max(0.0, began + n / rate - time.monotonic()))
                await self.layer.group_send(GROUP, {"type": "bench.message", "n": n, "sent": time.time()})

        async def add_connection(self, sock: socket.socket) -> None:
            sock.close()

    sticky.work(Bench())


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def one_run(kind: str, args: argparse.Namespace, redis_url: str, rate: float) -> dict[str, float]:
    env = dict(
        os.environ,
        BENCH_ROLE="server",
        BENCH_LAYER=kind,
        BENCH_REDIS=redis_url,
        BENCH_WORKERS=str(args.workers),
        BENCH_SUBSCRIBERS=str(args.subscribers),
        BENCH_MESSAGES=str(args.messages),
        BENCH_RATE=str(rate),
        PYTHONUNBUFFERED="1",
    )
    server = subprocess.Popen([sys.executable, os.path.abspath(__file__)], env=env, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout is not None
        deadline = time.monotonic() + args.timeout
        for line in server.stdout:
            if line.startswith("RESULT "):
                result = json.loads(line[7:])
                break
            if time.monotonic() > deadline:
                raise TimeoutError(f"{kind}: no result in {args.timeout} s")
        else:
            raise RuntimeError(f"{kind}: the server ended without a result")
    finally:
        server.terminate()
        server.wait(30)
    delays = sorted(result["delays"])
    rate = args.messages / result["seconds"]
    return {
        "group_sends": rate,
        "deliveries": rate * args.subscribers * args.workers,
        "p50_ms": delays[len(delays) // 2] * 1000,
        "p99_ms": delays[int(len(delays) * 0.99)] * 1000,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=500)
    parser.add_argument("--subscribers", type=int, default=250, help="per worker")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--timeout", type=float, default=300)
    parser.add_argument(
        "--paced", type=float, default=20, help="group_sends/s of the latency runs (default 20; 0: none)"
    )
    args = parser.parse_args()
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        sys.exit("needs redis-server on the PATH (apt-get install redis-server)")
    port = free_port()
    redis = subprocess.Popen(
        [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        time.sleep(0.5)
        loads = [("flood", 0.0)] + ([("paced", args.paced)] if args.paced else [])
        runs: dict[tuple[str, str], list[dict[str, float]]] = {}
        for round_number in range(args.rounds):
            for load, rate in loads:
                for kind in ("sticky", "redis"):
                    result = one_run(kind, args, f"redis://127.0.0.1:{port}", rate)
                    runs.setdefault((load, kind), []).append(result)
                    print(
                        f"round {round_number + 1} {load:<5} {kind:<7} {result['group_sends']:8.0f} group_send/s "
                        f"{result['deliveries']:10.0f} deliveries/s  p50 {result['p50_ms']:7.1f} ms  "
                        f"p99 {result['p99_ms']:7.1f} ms",
                        flush=True,
                    )
    finally:
        redis.terminate()
        redis.wait(10)
    print(f"\n{args.workers} workers x {args.subscribers} subscribers, {args.messages} group_sends; medians:")
    print(f"{'load':<6} {'layer':<24} {'group_send/s':>12} {'deliveries/s':>13} {'p50 ms':>8} {'p99 ms':>8}")
    medians = {
        key: {name: statistics.median(run[name] for run in results) for name in results[0]}
        for key, results in runs.items()
    }
    for (load, kind), m in medians.items():
        label = "StickyChannelLayer" if kind == "sticky" else "channels-redis (local)"
        print(
            f"{load:<6} {label:<24} {m['group_sends']:12.0f} {m['deliveries']:13.0f} "
            f"{m['p50_ms']:8.1f} {m['p99_ms']:8.1f}"
        )
    for load, _ in loads:
        sticky, redis_layer = medians[(load, "sticky")], medians[(load, "redis")]
        print(
            f"{load}: sticky vs channels-redis {sticky['group_sends'] / redis_layer['group_sends']:.2f}x the rate, "
            f"p50 {sticky['p50_ms'] / redis_layer['p50_ms']:.2f}x, p99 {sticky['p99_ms'] / redis_layer['p99_ms']:.2f}x"
        )


if __name__ == "__main__":
    if os.environ.get("BENCH_ROLE") == "server":
        run_server()
    else:
        main()
