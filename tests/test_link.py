"""One worker's link, without processes: what it owes, its counters, and whether it takes connections."""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest

from sticky_server.balancer import ClientInfo
from sticky_server.master import link as link_module
from sticky_server.master.link import FULL, NO_ROOM, Link, descriptor_headroom
from sticky_server.master.process import WorkerProcess
from sticky_server.protocol.frames import MASTER_SENDS, MAX_FDS_PER_FRAME, FrameKind, unpack_addressed, unpack_ids
from sticky_server.protocol.wire import FrameReader


@pytest.fixture
def link() -> Iterator[Link]:
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    master_end.setblocking(False)
    process: Any = None  # a link never touches the process
    worker = WorkerProcess(slot=2, process=process, control=master_end, started_at=0.0, worker_end=worker_end)
    made = Link(worker, last_heard=time.monotonic())
    yield made
    master_end.close()
    worker_end.close()


def connection(n: int, host: str = "10.0.0.1") -> tuple[int, int, ClientInfo]:
    read_end, write_end = os.pipe()
    os.close(read_end)
    return n, write_end, ClientInfo(host, 40000 + n, None, ("0.0.0.0", 80))


def test_each_condition_takes_the_worker_out_of_routing(link: Link) -> None:
    assert link.takes_connections
    for flag in ("full", "no_room"):
        setattr(link, flag, True)
        assert not link.takes_connections, flag
        setattr(link, flag, False)
    link.close()
    assert not link.takes_connections


def test_owed_connections_come_back_with_what_the_balancer_was_told(link: Link) -> None:
    entries = [connection(n) for n in range(MAX_FDS_PER_FRAME + 3)]
    for entry in entries:
        link.route(entry)
    assert (link.live, link.unread()) == (len(entries), len(entries))
    link.frame_pending(addressed=False, unpackable=lambda entry, error: None)
    assert link.pending == [] and link.outbox.queued_fds == len(entries) and link.unread() == len(entries)
    late = connection(999)
    link.route(late)  # routed after the frames were made: still owed, in order
    owed = link.close()
    assert owed == [*entries, late]
    assert not link.connected
    for _, fd, _ in owed:
        os.close(fd)


def test_sent_hand_offs_are_counted_once_and_carry_the_ids(link: Link) -> None:
    entries = [connection(n) for n in range(3)]
    for entry in entries:
        link.route(entry)
    link.frame_pending(addressed=True, unpackable=lambda entry, error: None)
    assert link.outbox.flush(link.worker.control)
    assert (link.sent()[0], link.sent()[0]) == (3, 0)
    assert link.taken == 3 and link.unread() == 3  # sent, not known to be read
    reader = FrameReader(MASTER_SENDS)
    assert link.worker.worker_end is not None
    frames, _ = reader.read_from(link.worker.worker_end)
    (frame,) = frames
    assert frame.kind is FrameKind.HANDOFF_PROXIED
    ids, addresses = unpack_addressed(frame.payload)
    assert ids == (0, 1, 2) and addresses == [("10.0.0.1", 40000), ("10.0.0.1", 40001), ("10.0.0.1", 40002)]
    assert link.unread(ask_kernel=True) == 0  # the kernel says the worker read them
    for fd in frame.fds:
        os.close(fd)


def test_an_address_that_does_not_pack_costs_only_its_own_connection(link: Link) -> None:
    good, bad = connection(1), connection(2, host="x" * 300)
    link.route(good)
    link.route(bad)
    failed: list[Any] = []
    link.frame_pending(addressed=True, unpackable=lambda entry, error: failed.append(entry))
    assert failed == [bad] and link.live == 1
    ((frame, tag),) = link.outbox.clear()
    assert unpack_addressed(frame.payload)[0] == (1,) and tag == [good]
    os.close(frame.fds[0])
    os.close(bad[1])


def test_plain_hand_offs_carry_only_ids(link: Link) -> None:
    entry = connection(7)
    link.route(entry)
    link.frame_pending(addressed=False, unpackable=lambda entry, error: None)
    ((frame, _),) = link.outbox.clear()
    assert frame.kind is FrameKind.HANDOFF and unpack_ids(frame.payload) == (7,)
    os.close(frame.fds[0])


def test_the_descriptor_ceiling_and_room_again(link: Link) -> None:
    link.max_live = descriptor_headroom(1024)
    assert link.max_live == 1024 - 128
    link.live = link.max_live
    assert link.at_ceiling() and not link.has_room_again()
    assert link.closed(50)[0] == 50 and not link.has_room_again()
    link.closed(40)
    assert link.has_room_again()  # a tenth of the ceiling closed
    assert link.closed(10**6)[0] == link.max_live - 90  # never below zero
    assert link.live == 0
    assert descriptor_headroom(0) is None and descriptor_headroom(40) == 8


# --- the link's own rules, with a fake clock ----------------------------------------------------


def test_rule_7_backed_up_at_two_looks_of_the_threshold_and_no_fewer(link: Link) -> None:
    from sticky_server.master.link import BACKED_UP_QUEUE

    assert not link.look_at_queue(BACKED_UP_QUEUE, now=1.0)  # once is not enough
    assert not link.look_at_queue(BACKED_UP_QUEUE - 1, now=1.1)  # fewer at the second look: draining
    assert not link.look_at_queue(BACKED_UP_QUEUE + 50, now=1.2)
    assert link.look_at_queue(BACKED_UP_QUEUE + 50, now=1.3)
    assert link.backed_up and not link.takes_connections and link.backed_up_at == 1.3
    link.last_heard = 1.0  # heard from before it was found backed up: still backed up
    assert not link.heard_since_backed_up() and link.backed_up
    link.last_heard = 1.4
    assert link.heard_since_backed_up() and link.takes_connections and link.queue_seen == 0


def test_rule_6_routing_up_to_the_ceiling_takes_it_out_and_a_tenth_closed_brings_it_back(link: Link) -> None:
    link.ready(160)  # its descriptor limit: the ceiling leaves 32 for its own files
    assert link.max_live == 128
    for n in range(127):
        assert link.route((n, -1, ClientInfo("10.0.0.1", n))) == 0
    assert link.route((127, -1, ClientInfo("10.0.0.1", 127))) == NO_ROOM
    assert link.no_room and not link.takes_connections
    assert link.closed(11) == (11, False)  # not yet a tenth (12)
    assert link.closed(1) == (1, True) and link.takes_connections
    link.pending.clear()  # (fake descriptors: nothing to close)


def test_rule_6_connections_lost_at_the_limit_lower_the_ceiling_to_what_it_holds(link: Link) -> None:
    link.ready(0)  # no limit known: no ceiling
    assert link.max_live is None
    link.accepts_reported_at = 0.0
    assert link.accepted_itself(50, now=1.0) == 0
    assert link.lost_at_limit(5) == (5, NO_ROOM)  # it holds 45 now: that is its ceiling
    assert link.max_live == 45 and link.no_room
    assert link.lost_at_limit(0) == (0, 0)  # already out
    assert link.closed(5) == (5, True)  # a tenth of 45 (4) and more closed: back


def test_rule_6_a_worker_that_accepts_up_to_its_ceiling_leaves_routing(link: Link) -> None:
    link.ready(64)
    assert link.max_live == 32
    link.accepts_reported_at = 0.0
    assert link.accepted_itself(31, now=1.0) == 0
    assert link.accepted_itself(1, now=1.1) == NO_ROOM and not link.takes_connections


def test_rule_3_full_at_max_queued_not_taken_and_back_at_half(link: Link, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(link_module, "MAX_QUEUED", 8)
    worker_end = link.worker.worker_end
    assert worker_end is not None
    for n in range(7):
        assert link.route(connection(n)) == 0
    assert link.route(connection(7)) == FULL and not link.takes_connections
    link.frame_pending(addressed=False, unpackable=lambda entry, error: None)
    assert link.outbox.flush(link.worker.control)
    assert link.sent() == (8, False)  # sent, but not read: still full
    assert not link.caught_up()
    reader = FrameReader(MASTER_SENDS)
    frames, _ = reader.read_from(worker_end)  # the worker reads them
    for frame in frames:
        for fd in frame.fds:
            os.close(fd)
    assert link.caught_up() and link.takes_connections  # the kernel says the worker read them
    assert not link.caught_up()  # once
    reader.close()


def test_max_connections_per_worker_recycles_once(link: Link) -> None:
    link.recycle_after = 3
    link.taken = 2
    assert not link.due_for_recycling()
    link.accepted = 1
    assert link.due_for_recycling() and link.recycling
    assert not link.due_for_recycling()


def test_counts_a_worker_could_not_have_are_protocol_errors(link: Link) -> None:
    from sticky_server.errors import ProtocolError
    from sticky_server.master.link import ACCEPT_BURST_SLACK, MAX_ACCEPT_RATE

    link.ready(0)
    with pytest.raises(ProtocolError, match="READY sent twice"):
        link.ready(0)
    link.accepts_reported_at = 10.0
    link.accepted_itself(ACCEPT_BURST_SLACK, now=10.0)  # a burst after a pause
    with pytest.raises(ProtocolError, match="ACCEPTED"):
        link.accepted_itself(ACCEPT_BURST_SLACK + MAX_ACCEPT_RATE + 1, now=11.0)
    link.accepted_itself(ACCEPT_BURST_SLACK + MAX_ACCEPT_RATE, now=12.0)  # a second's worth, and the burst
    assert link.accepted == link.live == 2 * ACCEPT_BURST_SLACK + MAX_ACCEPT_RATE
    with pytest.raises(ProtocolError, match="NO_ROOM"):
        link.lost_at_limit(link.live + 1)
    link.lost_at_limit(link.live)
