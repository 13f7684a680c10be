"""Least connections in real processes: workers report closes by themselves, whatever server they run."""

from __future__ import annotations

import collections
import json
import re
import socket

from .conftest import StartApp
from .harness import ServerProcess, wait_until


def open_held(address: tuple[str, int]) -> tuple[socket.socket, int]:
    """A connection the worker keeps open until we close it; returns it and its worker's slot."""
    sock = socket.create_connection(address, timeout=15)
    sock.sendall(b"hold\n")
    reply = json.loads(sock.makefile("rb").readline())
    return sock, int(reply["slot"])


def closes_reported(server: ServerProcess, slot: int) -> int:
    return sum(
        int(count)
        for found_slot, count in re.findall(r"^CLOSED (\d+) (\d+)$", server.output, re.M)
        if int(found_slot) == slot
    )


def test_least_connections_follows_live_counts_that_workers_report(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_BALANCER": "reporting-least-connections", "APP_MODE": "hold"})
    address = server.wait_listening()
    held = [open_held(address) for _ in range(6)]
    try:
        assert collections.Counter(slot for _, slot in held) == {0: 3, 1: 3}
        for sock, slot in held:
            if slot == 0:
                sock.close()
        # The worker's sweep notices the closes (its server, not us, closed the sockets).
        assert wait_until(lambda: closes_reported(server, 0) == 3, timeout=10), server.output_tail()
        more = [open_held(address) for _ in range(3)]
        held += more
        assert [slot for _, slot in more] == [0, 0, 0], "new connections must fill the emptied worker first"
    finally:
        for sock, _ in held:
            sock.close()
    assert wait_until(lambda: closes_reported(server, 1) == 3, timeout=10), server.output_tail()
