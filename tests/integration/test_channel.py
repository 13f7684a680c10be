"""The master/worker channel with real processes: order, routing, errors, hooks, bounds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
from pathlib import Path
from typing import Any

from sticky_server.balancer import IPHashBalancer, address_key

from .conftest import StartApp
from .harness import CLIENT_IPS, request, wait_until

CHANNEL = {"APP_CHANNEL": "1", "APP_WORKERS": "3"}


def ip_for_each_slot(slots: int) -> dict[int, str]:
    hasher = IPHashBalancer()
    found: dict[int, str] = {}
    for ip in CLIENT_IPS:
        found.setdefault(hasher.slot_for_key(address_key(ip), tuple(range(slots))), ip)
    assert len(found) == slots
    return found


def command(address: tuple[str, int], ip: str, text: str) -> Any:
    return request(address, source=ip, line=f"cmd {text}")["result"]


def inbox_of(address: tuple[str, int], ip: str) -> list[Any]:
    """The (sender, message) pairs the worker serving ``ip`` has received."""
    return list(command(address, ip, "inbox"))


def test_worker_messages_reach_the_master_in_order(start_app: StartApp) -> None:
    server = start_app(CHANNEL)
    address = server.wait_listening()
    slot_ip = ip_for_each_slot(3)
    assert command(address, slot_ip[1], "send-many 500") == "ok"
    assert wait_until(lambda: server.count(r"^FROM 1 \{\"n\"") == 500, timeout=15)
    numbers = [json.loads(line.split(" ", 2)[2])["n"] for line in server.lines if line.startswith('FROM 1 {"n"')]
    assert numbers == list(range(500))


def test_master_sends_to_one_worker_and_broadcasts_to_all(start_app: StartApp) -> None:
    server = start_app(CHANNEL)
    address = server.wait_listening()
    slot_ip = ip_for_each_slot(3)
    assert command(address, slot_ip[0], 'send {"to": 2, "data": "for two"}') == "ok"
    assert command(address, slot_ip[0], 'send {"broadcast": {"to": "all"}}') == "ok"

    def inbox(slot: int) -> list[Any]:
        return inbox_of(address, slot_ip[slot])

    assert wait_until(lambda: all([None, {"to": "all"}] in inbox(slot) for slot in range(3)), timeout=10)
    assert [None, "for two"] in inbox(2)
    assert [None, "for two"] not in inbox(0) + inbox(1)


def test_publish_reaches_the_other_workers_with_the_sender(start_app: StartApp) -> None:
    server = start_app(CHANNEL)
    address = server.wait_listening()
    slot_ip = ip_for_each_slot(3)
    assert command(address, slot_ip[1], 'publish "news"') == "ok"
    assert command(address, slot_ip[1], 'publish-self "echo"') == "ok"

    def inbox(slot: int) -> list[Any]:
        return inbox_of(address, slot_ip[slot])

    assert wait_until(lambda: all([1, "echo"] in inbox(slot) for slot in range(3)), timeout=10)
    assert [1, "news"] in inbox(0) and [1, "news"] in inbox(2)
    assert [1, "news"] not in inbox(1)
    # Per sender/receiver order: "news" was published before "echo".
    assert inbox(0).index([1, "news"]) < inbox(0).index([1, "echo"])


def test_messages_that_cannot_be_sent_raise_in_the_caller(start_app: StartApp) -> None:
    server = start_app(CHANNEL)
    address = server.wait_listening()
    set_error = command(address, CLIENT_IPS[0], "send-set")
    assert set_error.startswith("TypeError: message cannot be sent: Object of type set is not JSON serializable")
    huge_error = command(address, CLIENT_IPS[0], "send-huge")
    assert huge_error.startswith("ValueError: message is 2097154 bytes as JSON, over the 1048576 byte limit")
    assert command(address, CLIENT_IPS[0], 'send "still fine"') == "ok"
    server.wait_for(r'^FROM \d "still fine"$')


def test_lifecycle_hooks_see_workers_start_and_exit(start_app: StartApp) -> None:
    server = start_app(CHANNEL)
    address = server.wait_listening()
    for slot in range(3):
        server.wait_for(rf"^START {slot}$")
    victim = request(address)
    os.kill(victim["pid"], signal.SIGKILL)
    server.wait_for(rf"^EXIT {victim['slot']} -9$")
    assert wait_until(lambda: server.count(rf"^START {victim['slot']}$") == 2, timeout=15)


def test_a_worker_that_stops_reading_gets_a_bounded_queue_and_loses_its_oldest_messages(
    start_app: StartApp,
) -> None:
    env = {**CHANNEL, "APP_WORKERS": "2", "APP_BLOCK_SLOT": "0", "APP_TIMEOUT": "0", "APP_GRACEFUL": "2"}
    server = start_app(env)  # (the stuck worker is killed after 2 s on stop, not 10)
    address = server.wait_listening()
    slot_ip = ip_for_each_slot(2)
    master = server.process.pid

    def rss_mib() -> float:
        status = Path(f"/proc/{master}/status").read_text()
        return int(status.split("VmRSS:")[1].split()[0]) / 1024

    rss_before = rss_mib()
    stuck = request(address, source=slot_ip[1])  # (warm) then block slot 0 with a connection
    with contextlib.suppress(OSError):  # worker 0 is stuck in add_connection now, reading its socket no more
        request(address, source=slot_ip[0], timeout=0.5)

    # Two bursts of 12.8 MB: each fits a receiver's 16 MiB queue, so a worker that reads
    # loses nothing; the one that does not read overflows and loses its oldest.
    def received() -> int:
        return int(command(address, slot_ip[1], "inbox-count"))

    for burst in (1, 2):
        assert command(address, slot_ip[1], 'send {"flood": [64, 200000]}') == "ok"
        assert wait_until(lambda: received() >= 64 * burst, timeout=30)  # noqa: B023 (called in the loop)
        assert received() == 64 * burst
    server.wait_for(r"dropped \d+ oldest message\(s\) queued for slow workers", timeout=30)
    assert request(address, source=slot_ip[1])["pid"] == stuck["pid"]  # the others never noticed
    assert rss_mib() - rss_before < 64, "the master kept more than its bounded queue"


def test_a_worker_busy_with_slow_message_handlers_still_takes_its_connections(start_app: StartApp) -> None:
    server = start_app({**CHANNEL, "APP_WORKERS": "2", "APP_SLOW_MESSAGES": "0.02"})
    address = server.wait_listening()
    slot_ip = ip_for_each_slot(2)
    assert command(address, slot_ip[1], 'send {"flood": [100, 10]}') == "ok"  # the master relays 100 to each
    server.wait_for(r"^SLOW FLOOD STARTED 0$", timeout=30)
    # Worker 0 has read the 100 messages and is working through them, 20 ms each. A
    # connection to it is taken at the next turn of its loop, not after the 2 s backlog.
    handled = int(command(address, slot_ip[0], "inbox-count"))
    assert handled < 100, "the connection waited until every message had been handled"
