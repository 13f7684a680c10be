"""The master's handling of a worker's frames, in-process on real socketpairs (no processes).

The worker processes are stand-ins (a mocked Popen): these tests drive the
dispatcher's link reading by hand to check how it slices a flood of frames.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_mock import MockerFixture

from sticky_server import master as master_module
from sticky_server.balancer import IPHashBalancer
from sticky_server.channel import encode, pack_publish, unpack_delivery
from sticky_server.master import Dispatcher
from sticky_server.supervisor import Supervisor, WorkerProcess
from sticky_server.wire import MASTER_SENDS, FrameKind, FrameReader, Outbox, pack_ids

WORKERS = 2


class Setup:
    def __init__(self, dispatcher: Dispatcher, worker_ends: dict[int, socket.socket]) -> None:
        self.dispatcher = dispatcher
        self.worker_ends = worker_ends

    def link(self, slot: int) -> Any:
        return self.dispatcher._links[slot]

    def write(self, slot: int, outbox: Outbox) -> None:
        """What a worker would write: all of ``outbox`` in one go."""
        self.worker_ends[slot].setblocking(False)
        assert outbox.flush(self.worker_ends[slot])

    def received(self, slot: int) -> list[Any]:
        """The messages the master has written to ``slot`` so far."""
        reader = FrameReader(MASTER_SENDS)
        sock = self.worker_ends[slot]
        sock.setblocking(False)
        messages = []
        try:
            while True:
                frames, _ = reader.read_from(sock)
                messages += [unpack_delivery(frame.payload)[1] for frame in frames if frame.kind is FrameKind.MESSAGE]
        except BlockingIOError:
            return messages


@pytest.fixture
def setup(mocker: MockerFixture) -> Iterator[Setup]:
    worker_ends: dict[int, socket.socket] = {}

    def spawn(slot: int, command: list[str], cwd: str, now: float, **credentials: int) -> WorkerProcess:
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        master_end.setblocking(False)
        worker_ends[slot] = worker_end
        process = mocker.Mock(spec=subprocess.Popen, pid=1_000_000 + slot)
        process.poll.return_value = None
        return WorkerProcess(slot=slot, process=process, control=master_end, started_at=now)

    supervisor = Supervisor(WORKERS, ["not run"], spawn=spawn)
    dispatcher = Dispatcher([], supervisor, IPHashBalancer(), graceful_timeout=1.0)
    for slot in range(WORKERS):
        dispatcher._add_link(supervisor.start(slot))
    yield Setup(dispatcher, worker_ends)
    for link in list(dispatcher._by_worker.values()):
        link.worker.control.close()
    for sock in worker_ends.values():
        sock.close()


def publishes(messages: range) -> Outbox:
    outbox = Outbox()
    for n in messages:
        outbox.put_message(FrameKind.PUBLISH, pack_publish(False, encode(n)), 1 << 30)
    return outbox


def test_a_flood_of_publishes_is_relayed_a_slice_at_a_time(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher, sender = setup.dispatcher, setup.link(0)
    setup.write(0, publishes(range(100)))

    assert dispatcher._read_link(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush_touched()
    # One frame handled; the other 99 wait, and the loop will not sleep while they do.
    assert setup.received(1) == [0]
    assert dispatcher._select_timeout() == 0.0
    for _ in range(99):
        dispatcher._read_link(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush_touched()
    assert setup.received(1) == list(range(1, 100))  # the rest, in order
    assert dispatcher._select_timeout() is None  # nothing left: the loop may sleep again


def test_frames_read_before_a_worker_closed_are_all_handled(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher, sender = setup.dispatcher, setup.link(0)
    outbox = publishes(range(20))
    outbox.put(FrameKind.READY)
    setup.write(0, outbox)
    setup.worker_ends[0].close()

    while sender.connected:
        dispatcher._read_link(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush_touched()
    # Once the close was seen, what came before it was handled whole: every message relayed.
    assert setup.received(1) == list(range(20))
    assert sender.worker.ready


def test_an_ack_behind_a_flood_still_counts_when_the_worker_dies(setup: Setup, mocker: MockerFixture) -> None:
    """Rule 2: a connection the worker took is never routed again, even if its ACK came behind messages."""
    dispatcher, sender = setup.dispatcher, setup.link(0)
    client, server = socket.socketpair()
    sender.unacked[5] = (server.detach(), mocker.Mock())
    outbox = publishes(range(10))
    outbox.put(FrameKind.ACK, pack_ids([5]))
    setup.write(0, outbox)
    setup.worker_ends[0].close()
    route = mocker.spy(dispatcher, "_route")

    while sender.connected:
        dispatcher._read_link(sender, 0.0)  # one frame per slice: the test counts, not times
    assert route.call_count == 0 and not sender.unacked and sender.taken == 1
    client.close()


def test_calls_from_other_threads_run_a_slice_at_a_time_in_order(setup: Setup, mocker: MockerFixture) -> None:
    mocker.patch.object(master_module, "SLICE_SECONDS", 0.0)  # one call per slice: the test counts, not times
    dispatcher = setup.dispatcher
    dispatcher._loop_thread = -1  # as if the loop ran on another thread: calls are queued
    ran: list[int] = []
    for n in range(3):
        dispatcher.call_soon_threadsafe(lambda n=n: ran.append(n))  # type: ignore[misc]

    dispatcher._run_calls()
    assert ran == [0]
    assert dispatcher._select_timeout() == 0.0  # the loop comes straight back for the rest
    dispatcher.call_soon_threadsafe(lambda: ran.append(3))
    while dispatcher._select_timeout() == 0.0:
        dispatcher._run_calls()
    assert ran == [0, 1, 2, 3]
