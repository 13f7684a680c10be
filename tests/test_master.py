"""The master's handling of a worker's frames, in-process on real socketpairs (no processes).

The worker processes are stand-ins (a mocked Popen): these tests drive the
dispatcher's link reading by hand to check how it slices a flood of frames.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_mock import MockerFixture

from sticky_server.balancer import ClientInfo, IPHashBalancer
from sticky_server.master.loop import Dispatcher
from sticky_server.master.supervisor import Supervisor
from sticky_server.protocol.frames import MASTER_SENDS, FrameKind, pack_ids
from sticky_server.protocol.frames import encode as encode_frame
from sticky_server.protocol.messages import encode, pack_publish, unpack_delivery
from sticky_server.protocol.outbox import Outbox
from sticky_server.protocol.wire import FrameReader
from tests.fakes import FakeSpawn

from .worker_harness import tcp_pair

WORKERS = 2


class Setup:
    def __init__(self, dispatcher: Dispatcher, worker_ends: dict[int, socket.socket]) -> None:
        self.dispatcher = dispatcher
        self.worker_ends = worker_ends

    def link(self, slot: int) -> Any:
        return self.dispatcher._router.current[slot]

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
def setup() -> Iterator[Setup]:
    spawn = FakeSpawn(first_pid=1_000_000)
    supervisor = Supervisor(WORKERS, ["not run"], spawn=spawn, graceful_timeout=1.0)
    dispatcher = Dispatcher([], supervisor, IPHashBalancer())
    dispatcher._carry_out(supervisor.boot())
    yield Setup(dispatcher, spawn.worker_ends)
    spawn.close()


def publishes(messages: range) -> Outbox:
    outbox = Outbox()
    for n in messages:
        outbox.put_message(FrameKind.PUBLISH, pack_publish(False, encode(n)), 1 << 30)
    return outbox


def test_a_flood_of_publishes_is_relayed_a_slice_at_a_time(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher, sender = setup.dispatcher, setup.link(0)
    setup.write(0, publishes(range(100)))

    assert dispatcher._traffic.read(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush()
    # One frame handled; the other 99 wait, and the loop will not sleep while they do.
    assert setup.received(1) == [0]
    assert dispatcher._select_timeout() == 0.0
    for _ in range(99):
        dispatcher._traffic.read(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush()
    assert setup.received(1) == list(range(1, 100))  # the rest, in order
    assert dispatcher._select_timeout() is None  # nothing left: the loop may sleep again


def test_frames_read_before_a_worker_closed_are_all_handled(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher, sender = setup.dispatcher, setup.link(0)
    outbox = publishes(range(20))
    outbox.put(FrameKind.READY)
    setup.write(0, outbox)
    setup.worker_ends[0].close()

    while sender.connected:
        dispatcher._traffic.read(sender, 0.0)  # one frame per slice: the test counts, not times
    dispatcher._flush()
    # Once the close was seen, what came before it was handled whole: every message relayed.
    assert setup.received(1) == list(range(20))
    assert sender.worker.ready_at is not None


def test_hand_offs_a_dead_worker_never_read_are_routed_again_and_only_those(
    setup: Setup, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    """Rule 2: the master reads back, from its copy of the worker's end, what the worker never read."""
    dispatcher, link = setup.dispatcher, setup.link(0)
    worker_end = setup.worker_ends[0]
    link.worker.worker_end = worker_end.dup()  # as spawn_worker keeps it
    pairs = [tcp_pair(f"127.0.0.{30 + n}") for n in range(4)]
    for conn_id, (client, accepted) in enumerate(pairs):  # four passes of the loop: four frames
        link.pending.append((conn_id, accepted.detach(), ClientInfo(*client.getsockname())))
        dispatcher._traffic.touched.add(link)
        dispatcher._flush()
    frame_size = len(encode_frame(FrameKind.HANDOFF, pack_ids([0]), 1))
    # The worker reads the first hand-off whole and 2 bytes of the second, then dies.
    for size in (frame_size, 2):
        _, ancillary, _, _ = worker_end.recvmsg(size, socket.CMSG_SPACE(4))
        os.close(int.from_bytes(ancillary[0][2], sys.byteorder))
    worker_end.close()
    route = mocker.spy(dispatcher, "_route")

    with caplog.at_level(logging.WARNING, logger="sticky_server"):
        dispatcher._traffic.close(link)
        dispatcher._traffic.read_back(link)

    parked = list(dispatcher._router.parked)  # to route among the others at the end of this pass
    assert [entry[0] for entry in parked] == [2, 3]
    assert [entry[2].host for entry in parked] == ["127.0.0.32", "127.0.0.33"]
    for (_, fd, _), (client, _) in zip(parked, pairs[2:], strict=True):
        with socket.socket(fileno=os.dup(fd)) as sock:
            assert sock.getpeername() == client.getsockname()  # each id came back with its own connection
    dispatcher._flush()  # routed to worker 1 (which closes the master's copies)
    assert [call.args[0] for call in route.call_args_list] == [2, 3] and not dispatcher._router.parked
    assert "died while reading a hand-off; its 1 connection(s) are lost" in caplog.text
    assert "went away holding 2 connection(s) it had not taken; routing them again" in caplog.text
    assert link.worker.worker_end is None
    for client, _ in pairs:
        client.close()


def test_hand_offs_not_sent_yet_are_routed_again_when_the_link_closes(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher, link = setup.dispatcher, setup.link(0)
    with contextlib.suppress(BlockingIOError):
        while True:
            link.worker.control.send(encode_frame(FrameKind.PING))  # a worker that stopped reading
    client, accepted = tcp_pair("127.0.0.40")
    link.pending.append((9, accepted.detach(), ClientInfo(*client.getsockname())))
    dispatcher._traffic.touched.add(link)
    dispatcher._flush()
    assert link.outbox.queued_fds == 1  # could not go: still the master's
    route = mocker.spy(dispatcher, "_route")

    dispatcher._traffic.close(link)
    dispatcher._flush()

    (call,) = route.call_args_list
    assert call.args[0] == 9 and call.args[2].host == "127.0.0.40"
    client.close()


def test_calls_from_other_threads_run_a_slice_at_a_time_in_order(setup: Setup, mocker: MockerFixture) -> None:
    dispatcher = setup.dispatcher
    calls = dispatcher._calls
    calls.loop_thread = -1  # as if the loop ran on another thread: calls are queued
    ran: list[int] = []
    for n in range(3):
        dispatcher.call_soon_threadsafe(lambda n=n: ran.append(n))  # type: ignore[misc]

    calls.run(seconds=0.0)  # one call per slice: the test counts, not times
    assert ran == [0]
    assert dispatcher._select_timeout() == 0.0  # the loop comes straight back for the rest
    dispatcher.call_soon_threadsafe(lambda: ran.append(3))
    while dispatcher._select_timeout() == 0.0:
        calls.run(seconds=0.0)
    assert ran == [0, 1, 2, 3]
