"""Publish/subscribe across 3 workers while one is killed: for tests/integration/test_broadcast.py.

Every worker subscribes to ``ticks`` when it starts (and to it a second time, which it
closes after ``EARLY`` messages). Once all three are ready the master tells worker 1 to
publish APP_MESSAGES ticks (APP_PAD bytes each), paced over about two seconds; the
test stops worker 2 meanwhile, and then kills it. Each worker that hears the last tick reports what it heard; the master
prints ``RESULT {json}`` for each and ``STATS {json}`` (its figures) after workers 0
and 1 have reported.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import threading
import time
from typing import Any

from sticky_server import AsyncWorker, StickyServer, pubsub

EARLY = 100
MESSAGES = int(os.environ.get("APP_MESSAGES", "4000"))
PAD = "x" * int(os.environ.get("APP_PAD", "0"))  # bytes added to each tick


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())


sticky = StickyServer(workers=3, graceful_timeout=5)


class Listening(AsyncWorker):
    async def start(self) -> None:
        self.ticks = pubsub.subscribe("ticks", max_queued=MESSAGES + 10)
        self.early = pubsub.subscribe("ticks")
        asyncio.get_running_loop().create_task(self.count())
        asyncio.get_running_loop().create_task(self.close_early())
        sticky.on_message(self.heard)
        sticky.send({"ready": os.getpid()})

    async def close_early(self) -> None:
        for _ in range(EARLY):
            await self.early.get()
        self.early.close()

    async def count(self) -> None:
        numbers = []
        async for message in self.ticks:
            numbers.append(message["n"])
            if message["n"] == MESSAGES - 1:
                break
        await asyncio.sleep(0.2)  # anything still arriving for the closed subscription would be queued by now
        sticky.send(
            {
                "slot": sticky.worker_id,
                "heard": len(numbers),
                "in_order": numbers == sorted(numbers),
                "first": numbers[0] if numbers else None,
                "early_closed": self.early.closed,
                "early_queued": len(self.early._queue),
            }
        )

    def heard(self, sender: int | None, message: Any) -> None:
        if sender is None and message == "publish":
            threading.Thread(target=self.publish, daemon=True).start()

    def publish(self) -> None:
        began = time.monotonic()
        say("PUBLISHING")
        for n in range(MESSAGES):
            time.sleep(max(0.0, began + 2.0 * n / MESSAGES - time.monotonic()))
            pubsub.publish("ticks", {"n": n, "pad": PAD})

    async def add_connection(self, sock: socket.socket) -> None:
        sock.close()


if __name__ == "__main__":
    if sticky.is_master:
        started: dict[int, int] = {}
        reported: dict[int, Any] = {}

        @sticky.on_message
        def heard(slot: int, message: Any) -> None:
            if "ready" in message:
                say(f"READY {slot} {message['ready']}")
                if slot not in started and len(started) < 3:
                    started[slot] = message["ready"]
                    if len(started) == 3:
                        sticky.send("publish", to=1)
            else:
                reported[slot] = message
                say("RESULT " + json.dumps(message))
                if 0 in reported and 1 in reported:
                    say("STATS " + json.dumps(sticky.stats()))

        sticky.on_listening(lambda address: say(f"LISTENING {address[0]} {address[1]}"))
        sticky.listen(0, host="127.0.0.1")
    else:
        sticky.work(Listening())
