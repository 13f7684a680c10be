"""Broadcast across workers with no Redis, for apps other than socket.io, through the command.

- The Django Channels tutorial's chat on ``StickyChannelLayer``, 4 workers: 20 websocket
  clients (the ``websockets`` library) from 20 addresses, each sends one message, and
  each message reaches all 20 exactly once (400/400). Control: channels' own
  ``InMemoryChannelLayer`` (what Django Channels uses without Redis) loses most of them,
  and the server warns at start, naming the sticky layer.
- A FastAPI websocket chat with rooms on broadcaster's ``Broadcast`` with ``StickyBackend``:
  the same 20 clients, 400/400, and ``curl -N`` reading the room as server-sent events
  (sse-starlette) from 4 more addresses hears all 20 messages. Control: ``memory://``.
- ``sticky_server.pubsub`` while a worker is killed mid-broadcast: the others hear every
  message in order, a closed subscription gets nothing more, the master counts what the
  dead worker's slot missed (``messages_dropped``).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from typing import Any

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE
from .websocket_chat import assert_each_heard_each_once, chat

CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
CLIENTS = 20


def serve(start_app: StartApp, target: str, *flags: str, env: dict[str, str] | None = None) -> Any:
    command = [sys.executable, "-m", "sticky_server", target, "--asgi", "-w", "4", "-b", "127.0.0.1:0", *flags]
    return start_app(command=[*command, "--graceful-timeout", "2"], cwd=HERE, env=env)


@pytest.mark.parametrize("layer", ["sticky", "in-memory"])
def test_the_channels_tutorial_chat_reaches_every_client_on_every_worker(start_app: StartApp, layer: str) -> None:
    env = {"APP_LAYER": "channels.layers.InMemoryChannelLayer"} if layer == "in-memory" else None
    app = serve(start_app, "apps.django_chat:application", env=env)
    port = int(app.wait_for(CLI_LISTENING, 60).group(1))
    heard = asyncio.run(chat(port, "/ws/chat/lobby/", CLIENTS, patience=3 if layer == "in-memory" else 15))
    workers = Counter(entry["worker"] for messages in heard.values() for entry in messages)
    deliveries = sum(len(messages) for messages in heard.values())
    if layer == "in-memory":
        assert deliveries < CLIENTS * CLIENTS, "the in-memory layer reached every worker's clients"
        app.wait_for(r"InMemoryChannelLayer.*keeps each worker's.*StickyChannelLayer", 5)
        return
    assert_each_heard_each_once(heard, "message")
    assert deliveries == CLIENTS * CLIENTS
    assert len(workers) >= 3, workers  # the clients were spread over the workers


class EventStream:
    """``curl -N`` reading a server-sent event stream from ``ip``: its data lines, as they come."""

    def __init__(self, url: str, ip: str) -> None:
        command = ["curl", "-sS", "-N", "--max-time", "60", "--interface", ip, url]
        self.process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("data:"):
                self.lines.put(line[5:].strip())

    def data(self, timeout: float) -> str:
        return self.lines.get(timeout=timeout)

    def close(self) -> None:
        self.process.terminate()
        self.process.wait(10)


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("backend", ["sticky", "memory"])
def test_fastapi_rooms_on_broadcaster_reach_every_client_and_event_stream(start_app: StartApp, backend: str) -> None:
    env = {"APP_BROADCAST": "memory"} if backend == "memory" else None
    app = serve(start_app, "apps.fastapi_rooms:app", env=env)
    port = int(app.wait_for(CLI_LISTENING, 60).group(1))
    streams = [EventStream(f"http://127.0.0.1:{port}/rooms/lobby/events", ip) for ip in CLIENT_IPS[-4:]]
    try:
        stream_workers = {stream.data(15) for stream in streams}  # each says "ready" once it has subscribed
        heard = asyncio.run(chat(port, "/rooms/lobby", CLIENTS, patience=3 if backend == "memory" else 15))
        deliveries = sum(len(messages) for messages in heard.values())
        if backend == "memory":
            assert deliveries < CLIENTS * CLIENTS, "memory:// reached every worker's clients"
            app.wait_for(r"memory:// keeps each worker's subscribers to itself.*StickyBackend", 5)
            return
        assert_each_heard_each_once(heard, "text", '{{"message": "from {}"}}')
        assert len({entry["worker"] for messages in heard.values() for entry in messages}) >= 3
        assert len(stream_workers) >= 2, stream_workers  # the event streams were served by other workers too
        for stream in streams:
            texts = Counter(json.loads(stream.data(10))["text"] for _ in range(CLIENTS))
            assert texts == Counter({f'{{"message": "from {sender}"}}': 1 for sender in heard}), texts
    finally:
        for stream in streams:
            stream.close()


def test_a_worker_killed_mid_broadcast_leaves_the_others_delivering(start_app: StartApp) -> None:
    """Worker 1 publishes 4000 ticks of 1 kB over 2 s; worker 2 stops reading (SIGSTOP), then is killed. Workers
    0 and 1 hear every tick in order; a subscription closed after 100 holds nothing more; the master counts
    the ticks that went with worker 2 unread (its slot's ``messages_dropped``)."""
    app = start_app(script=HERE / "apps" / "pubsub_app.py", env={"APP_MESSAGES": "4000", "APP_PAD": "1000"})
    app.wait_for("PUBLISHING", 60)  # (after all three said READY)
    pids = {int(slot): int(pid) for slot, pid in re.findall(r"READY (\d) (\d+)", "\n".join(app.lines))}
    time.sleep(0.3)
    os.kill(pids[2], signal.SIGSTOP)  # its socket fills, then the master queues for it
    time.sleep(0.7)
    os.kill(pids[2], signal.SIGKILL)
    stats = json.loads(app.wait_for(r"STATS (\{.*\})", 60).group(1))
    results = [json.loads(match) for match in re.findall(r"RESULT (\{.*\})", "\n".join(app.lines))]
    for slot in (0, 1):
        (result,) = [entry for entry in results if entry["slot"] == slot]
        assert result["heard"] == 4000 and result["in_order"], result
        assert result["early_closed"] and result["early_queued"] == 0, result
    dropped = [worker["messages_dropped"] for worker in stats["workers"]]
    assert dropped[0] == dropped[1] == 0 and dropped[2] > 0, dropped
