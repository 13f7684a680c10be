"""The frame format: round trips, partial reads, fd passing on a real socketpair, and hostile bytes."""

from __future__ import annotations

import array
import contextlib
import os
import resource
import socket
import struct
from collections.abc import Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sticky_server.errors import ProtocolError
from sticky_server.protocol.frames import (
    HEADER,
    LOST_FD,
    MASTER_SENDS,
    MAX_FDS_PER_FRAME,
    MAX_PAYLOAD,
    WORKER_SENDS,
    Frame,
    FrameKind,
    encode,
    pack_addressed,
    pack_ids,
    unpack_addressed,
    unpack_ids,
)
from sticky_server.protocol.outbox import Outbox
from sticky_server.protocol.wire import FrameReader, read_back, unread_bytes


@pytest.fixture
def nonblocking_pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    """(master end, worker end) of a control socketpair, both non-blocking as in the server."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    master.setblocking(False)
    worker.setblocking(False)
    with master, worker:
        yield master, worker


def test_frames_round_trip_whole_and_byte_by_byte() -> None:
    data = encode(FrameKind.CLOSED, pack_ids([1, 2**64 - 1])) + encode(FrameKind.READY)
    assert FrameReader(WORKER_SENDS).feed(data) == [
        Frame(FrameKind.CLOSED, pack_ids([1, 2**64 - 1])),
        Frame(FrameKind.READY),
    ]
    reader = FrameReader(WORKER_SENDS)
    frames = [frame for byte in data for frame in reader.feed(bytes([byte]))]
    assert [frame.kind for frame in frames] == [FrameKind.CLOSED, FrameKind.READY]
    assert unpack_ids(frames[0].payload) == (1, 2**64 - 1)
    assert reader.pending_bytes == 0


def test_descriptors_are_claimed_in_order_by_the_frames_that_declare_them() -> None:
    reader = FrameReader(MASTER_SENDS)
    # Descriptors may arrive before the bytes of their frame (rule 1), never after.
    frames = reader.feed(encode(FrameKind.HANDOFF, pack_ids([7]), 1), fds=[100])
    frames += reader.feed(encode(FrameKind.HANDOFF, pack_ids([8, 9]), 2)[:5], fds=[101, 102])
    assert frames == [Frame(FrameKind.HANDOFF, pack_ids([7]), (100,))]
    frames = reader.feed(encode(FrameKind.HANDOFF, pack_ids([8, 9]), 2)[5:])
    assert frames == [Frame(FrameKind.HANDOFF, pack_ids([8, 9]), (101, 102))]


def _open_fds(count: int) -> list[int]:
    return [os.open(os.devnull, os.O_RDONLY) for _ in range(count)]


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize(
    ("accepted", "data", "n_fds", "message"),
    [
        (WORKER_SENDS, HEADER.pack(99, 0, 0, 0), 0, "unknown frame kind 99"),
        (WORKER_SENDS, encode(FrameKind.HANDOFF), 0, "HANDOFF is not allowed"),
        (WORKER_SENDS, HEADER.pack(FrameKind.PONG, 1, 0, 0), 0, "flags must be 0"),
        (WORKER_SENDS, HEADER.pack(FrameKind.PONG, 0, MAX_FDS_PER_FRAME + 1, 0), 0, "PONG declares 65 descriptors"),
        (WORKER_SENDS, HEADER.pack(FrameKind.PONG, 0, 0, MAX_PAYLOAD + 1), 0, "byte payload"),
        # Rule 5: descriptors from a peer that sends none, or on a kind that carries none.
        (
            WORKER_SENDS - {FrameKind.MOVED},
            encode(FrameKind.SEND, b"{}"),
            1,
            "1 descriptor.s. arrived from a peer that may send none",
        ),
        (MASTER_SENDS, HEADER.pack(FrameKind.PING, 0, 1, 0), 1, "PING declares 1 descriptors .it carries none"),
        (MASTER_SENDS, encode(FrameKind.HANDOFF, pack_ids([1, 2]), 2), 1, "declares 2 descriptors but 1 arrived"),
        (MASTER_SENDS, encode(FrameKind.PING), 2, "2 descriptor.s. arrived that no frame declares"),
        (MASTER_SENDS, encode(FrameKind.HANDOFF, pack_ids([1]), 1), 3, "2 descriptor.s. arrived that no frame"),
    ],
)
def test_invalid_frames_are_protocol_errors_and_close_every_descriptor(
    accepted: frozenset[FrameKind], data: bytes, n_fds: int, message: str
) -> None:
    fds = _open_fds(n_fds)
    with pytest.raises(ProtocolError, match=message):
        FrameReader(accepted).feed(data, fds)
    assert not [fd for fd in fds if _is_open(fd)]


def test_a_frame_whose_descriptors_the_kernel_dropped_gets_lost_fd_in_their_place() -> None:
    reader = FrameReader(MASTER_SENDS)
    fds = _open_fds(1)
    frames = reader.feed(encode(FrameKind.HANDOFF, pack_ids([1, 2, 3]), 3), fds, truncated=True)
    assert frames == [Frame(FrameKind.HANDOFF, pack_ids([1, 2, 3]), (fds[0], LOST_FD, LOST_FD))]
    assert reader.lost_fds == 2
    os.close(fds[0])
    # The next frame is whole again: a shortfall without truncation is still an error.
    with pytest.raises(ProtocolError, match="declares 1 descriptors but 0 arrived"):
        reader.feed(encode(FrameKind.HANDOFF, pack_ids([4]), 1))


def test_a_worker_at_its_descriptor_limit_receives_what_fits_and_the_rest_as_lost(
    nonblocking_pair: tuple[socket.socket, socket.socket],
) -> None:
    """Over a real socket: the kernel truncates (MSG_CTRUNC) when the receiver is at its limit."""
    master, worker = nonblocking_pair
    outbox = Outbox()
    outbox.put(FrameKind.HANDOFF, pack_ids([1, 2, 3]), _open_fds(3))
    assert outbox.flush(master)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    probe = os.open(os.devnull, os.O_RDONLY)
    os.close(probe)
    fillers: list[int] = []
    reader = FrameReader(MASTER_SENDS)
    try:
        # Fill every free descriptor number under a low limit, then free exactly one.
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(probe + 64, 64), hard))
        with contextlib.suppress(OSError):
            while True:
                fillers.append(os.open(os.devnull, os.O_RDONLY))
        os.close(fillers.pop())
        frames, closed = reader.read_from(worker)
    finally:
        for fd in fillers:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert not closed
    assert len(frames) == 1
    assert frames[0].fds[0] >= 0 and frames[0].fds[1:] == (LOST_FD, LOST_FD)
    assert reader.lost_fds == 2
    os.close(frames[0].fds[0])


def test_id_lists_must_be_whole_u64s() -> None:
    with pytest.raises(ProtocolError, match="not a multiple of 8"):
        unpack_ids(b"\x00" * 9)


def test_encode_refuses_what_no_reader_would_accept() -> None:
    with pytest.raises(ValueError, match="0 to 64 descriptors"):
        encode(FrameKind.HANDOFF, b"", MAX_FDS_PER_FRAME + 1)
    with pytest.raises(ValueError, match="over the"):
        encode(FrameKind.PONG, bytes(MAX_PAYLOAD + 1))


@settings(max_examples=400, deadline=None)
@given(st.lists(st.binary(max_size=64), max_size=8), st.integers(min_value=0, max_value=4))
def test_arbitrary_bytes_never_raise_anything_but_protocol_error(chunks: list[bytes], n_fds: int) -> None:
    reader = FrameReader(WORKER_SENDS)
    fds = list(range(10_000, 10_000 + n_fds))
    try:
        for index, chunk in enumerate(chunks):
            for frame in reader.feed(chunk, fds if index == 0 else ()):
                assert frame.kind in WORKER_SENDS
    except ProtocolError:
        pass


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(sorted(WORKER_SENDS)), st.binary(max_size=40)), max_size=6), st.data())
def test_any_split_of_valid_frames_decodes_to_the_same_frames(
    frames: list[tuple[FrameKind, bytes]], data: st.DataObject
) -> None:
    stream = b"".join(encode(kind, payload) for kind, payload in frames)
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=5)))
    reader = FrameReader(WORKER_SENDS)
    decoded: list[Frame] = []
    for start, end in zip([0, *cuts], [*cuts, len(stream)], strict=True):
        decoded += reader.feed(stream[start:end])
    assert decoded == [Frame(kind, payload) for kind, payload in frames]


class StingySocket:
    """A real socket whose sendmsg writes at most ``limit`` bytes per call, as a full buffer would."""

    def __init__(self, sock: socket.socket, limit: int) -> None:
        self.sock = sock
        self.limit = limit
        self.calls_with_fds = 0
        self.calls = 0

    def sendmsg(self, buffers: list[memoryview], ancillary: list[tuple[int, int, bytes]]) -> int:
        self.calls += 1
        self.calls_with_fds += bool(ancillary)
        return self.sock.sendmsg([bytes(buffers[0])[: self.limit]], ancillary)


def test_descriptors_pass_over_a_real_socketpair_when_every_send_is_partial() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(120)]
    try:
        stingy = StingySocket(master, limit=7)
        outbox = Outbox()
        for start in range(0, 120, 10):
            ids = list(range(start, start + 10))
            outbox.put(FrameKind.HANDOFF, pack_ids(ids), [os.dup(pipes[n][1]) for n in ids])  # the outbox owns these
            outbox.put(FrameKind.STOP)
        reader = FrameReader(MASTER_SENDS)
        received: list[Frame] = []
        while not outbox.flush(stingy):  # type: ignore[arg-type]
            frames, _closed = reader.read_from(worker)
            received += frames
        while len(received) < 24:
            received += reader.read_from(worker)[0]

        assert stingy.calls > 24 and stingy.calls_with_fds == 12  # fds ride on each frame's first piece only
        handoffs = [frame for frame in received if frame.kind is FrameKind.HANDOFF]
        assert [unpack_ids(frame.payload) for frame in handoffs] == [
            tuple(range(start, start + 10)) for start in range(0, 120, 10)
        ]
        # Each received descriptor is the write end of the pipe with the same id.
        for frame in handoffs:
            for conn_id, fd in zip(unpack_ids(frame.payload), frame.fds, strict=True):
                os.write(fd, struct.pack(">I", conn_id))
                os.close(fd)
                assert struct.unpack(">I", os.read(pipes[conn_id][0], 4)) == (conn_id,)
    finally:
        master.close()
        worker.close()
        for read_end, write_end in pipes:
            os.close(read_end)
            os.close(write_end)


def test_a_full_socket_buffer_keeps_frames_queued_until_it_drains(
    nonblocking_pair: tuple[socket.socket, socket.socket],
) -> None:
    master, worker = nonblocking_pair
    outbox = Outbox()
    for _ in range(64):
        outbox.put(FrameKind.STOP, bytes(64 * 1024))
    assert outbox.flush(master) is False  # the master never blocks on a worker
    assert len(outbox) > 0
    reader = FrameReader(MASTER_SENDS)
    received = 0
    while received < 64:
        outbox.flush(master)
        with contextlib.suppress(BlockingIOError):
            received += len(reader.read_from(worker)[0])
    assert outbox.flush(master) is True


def test_unclaimed_descriptors_are_closed_by_the_reader() -> None:
    read_end, write_end = os.pipe()
    try:
        reader = FrameReader(MASTER_SENDS)
        reader.feed(encode(FrameKind.HANDOFF, pack_ids([1]), 1)[:3], fds=[write_end])
        reader.close()
        with pytest.raises(OSError):
            os.fstat(write_end)
    finally:
        os.close(read_end)


def test_peer_closing_is_reported() -> None:
    left, right = socket.socketpair()
    right.close()
    assert FrameReader(WORKER_SENDS).read_from(left) == ([], True)
    left.close()


def test_flush_to_a_closed_peer_raises() -> None:
    left, right = socket.socketpair()
    right.close()
    outbox = Outbox()
    outbox.put(FrameKind.STOP)
    with pytest.raises((BrokenPipeError, ConnectionResetError)):
        outbox.flush(left)
    left.close()


def drain(outbox: Outbox, sock: socket.socket, peer: socket.socket) -> list[Frame]:
    """Flush ``outbox`` into ``sock`` and read everything on ``peer``."""
    reader = FrameReader(MASTER_SENDS)
    frames: list[Frame] = []
    peer.setblocking(False)
    while True:
        flushed = outbox.flush(sock)
        try:
            frames += reader.read_from(peer)[0]
        except BlockingIOError:
            if flushed:
                return frames


def test_control_frames_overtake_queued_messages() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with master, worker:
        master.setblocking(False)
        outbox = Outbox()
        for n in range(3):
            outbox.put_message(FrameKind.MESSAGE, bytes([n]), max_bytes=1 << 20)
        outbox.put(FrameKind.PING)
        outbox.put(FrameKind.STOP)
        kinds = [frame.kind for frame in drain(outbox, master, worker)]
    assert kinds == [FrameKind.PING, FrameKind.STOP, FrameKind.MESSAGE, FrameKind.MESSAGE, FrameKind.MESSAGE]


def test_message_queue_is_bounded_by_dropping_the_oldest() -> None:
    outbox = Outbox()
    dropped = [outbox.put_message(FrameKind.MESSAGE, bytes([n]) * 100, max_bytes=350) for n in range(6)]
    assert dropped == [0, 0, 0, 1, 1, 1]
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with master, worker:
        master.setblocking(False)
        payloads = [frame.payload[0] for frame in drain(outbox, master, worker)]
    assert payloads == [3, 4, 5]  # the newest survive, in order


def test_messages_put_back_unsent_are_still_dropped_one_by_one() -> None:
    """A run of messages leaves as one joined buffer; if the socket takes none of it, it comes back as messages."""

    class Full:
        def sendmsg(self, buffers: list[memoryview], ancillary: list[tuple[int, int, bytes]]) -> int:
            raise BlockingIOError

    outbox = Outbox()
    for n in range(3):
        outbox.put_message(FrameKind.MESSAGE, bytes([n]) * 100, max_bytes=1000)
    assert not outbox.flush(Full())  # type: ignore[arg-type]
    assert len(outbox) == 3
    assert outbox.put_message(FrameKind.MESSAGE, bytes([3]) * 100, max_bytes=350) == 1  # one message, not the run
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with master, worker:
        master.setblocking(False)
        payloads = [frame.payload[0] for frame in drain(outbox, master, worker)]
    assert payloads == [1, 2, 3]


def test_many_small_frames_go_out_in_few_sendmsg_calls() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with master, worker:

        class Counting:
            calls = 0

            def sendmsg(self, buffers: list[memoryview], ancillary: list[tuple[int, int, bytes]]) -> int:
                self.calls += 1
                return master.sendmsg(buffers, ancillary)

        counting = Counting()
        outbox = Outbox()
        for n in range(640):
            outbox.put_message(FrameKind.MESSAGE, n.to_bytes(2, "big"), max_bytes=1 << 20)
        assert outbox.flush(counting)  # type: ignore[arg-type]
        assert counting.calls == 2  # up to GATHER_FRAMES (512) frames per call
        reader = FrameReader(MASTER_SENDS)
        frames: list[Frame] = []
        while len(frames) < 640:
            frames += reader.read_from(worker)[0]
    assert [int.from_bytes(frame.payload, "big") for frame in frames] == list(range(640))


def test_a_partial_write_in_the_middle_of_a_batch_keeps_every_frame_in_order() -> None:
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with master, worker:

        class Trickle:
            """Writes at most 13 bytes of the gathered buffers per call."""

            def sendmsg(self, buffers: list[memoryview], ancillary: list[tuple[int, int, bytes]]) -> int:
                return master.sendmsg([b"".join(bytes(b) for b in buffers)[:13]], ancillary)

        outbox = Outbox()
        read_end, write_end = os.pipe()
        try:
            for n in range(20):
                outbox.put_message(FrameKind.MESSAGE, bytes([n]) * 5, max_bytes=1 << 20)
                if n % 5 == 0:
                    outbox.put(FrameKind.HANDOFF, pack_ids([n]), [os.dup(write_end)])  # the outbox owns these
            reader = FrameReader(MASTER_SENDS)
            frames: list[Frame] = []
            worker.setblocking(False)
            for _ in range(10_000):
                done = outbox.flush(Trickle())  # type: ignore[arg-type]
                with contextlib.suppress(BlockingIOError):
                    frames += reader.read_from(worker)[0]
                if done and len(frames) == 24:
                    break
        finally:
            os.close(read_end)
            os.close(write_end)
    handoffs = [frame for frame in frames if frame.kind is FrameKind.HANDOFF]
    messages = [frame.payload[0] for frame in frames if frame.kind is FrameKind.MESSAGE]
    assert [unpack_ids(frame.payload) for frame in handoffs] == [(0,), (5,), (10,), (15,)]
    assert all(len(frame.fds) == 1 for frame in handoffs)
    for frame in handoffs:
        os.close(frame.fds[0])
    assert messages == list(range(20))


def test_addressed_hand_offs_round_trip_and_reject_garbage() -> None:
    ids = [1, 2**40, 7]
    addresses = [("203.0.113.9", 443), ("2001:db8::1", 0), ("", 0)]
    assert unpack_addressed(pack_addressed(ids, addresses)) == (tuple(ids), addresses)
    packed = pack_addressed(ids, addresses)
    for bad in (packed[:-1], packed + b"x", b"", b"\x00\x01" + bytes(5)):
        with pytest.raises(ProtocolError, match="addressed hand-off"):
            unpack_addressed(bad)


@given(st.binary(max_size=200))
@settings(max_examples=500, deadline=None)
def test_arbitrary_addressed_payloads_only_raise_protocol_errors(data: bytes) -> None:
    try:
        ids, addresses = unpack_addressed(data)
    except ProtocolError:
        return
    assert len(ids) == len(addresses)


def test_readers_on_one_thread_share_the_receive_buffer_without_mixing_their_streams() -> None:
    pairs = [socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(2)]
    try:
        readers = [FrameReader(MASTER_SENDS) for _ in pairs]
        big = [encode(FrameKind.MESSAGE, bytes([index + 1]) * 300_000) for index in range(2)]
        for sender, receiver in pairs:
            sender.setblocking(False)
            receiver.setblocking(False)
        sent = [0, 0]
        frames: list[list[Frame]] = [[], []]
        while not all(frames):
            for index, ((sender, receiver), reader) in enumerate(zip(pairs, readers, strict=True)):
                with contextlib.suppress(BlockingIOError):
                    sent[index] += sender.send(big[index][sent[index] : sent[index] + 50_000])
                with contextlib.suppress(BlockingIOError):
                    frames[index] += reader.read_from(receiver)[0]  # each stream ends mid-frame in turn
        assert [f.payload for f in frames[0]] == [bytes([1]) * 300_000]
        assert [f.payload for f in frames[1]] == [bytes([2]) * 300_000]
    finally:
        for sender, receiver in pairs:
            sender.close()
            receiver.close()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_an_outbox_closes_each_descriptor_once_sent_and_gives_back_those_not_sent(
    nonblocking_pair: tuple[socket.socket, socket.socket],
) -> None:
    master, _worker = nonblocking_pair
    read_end, write_end = os.pipe()
    try:
        outbox = Outbox()
        first, second = os.dup(write_end), os.dup(write_end)
        outbox.put(FrameKind.HANDOFF, pack_ids([1]), [first])
        assert outbox.queued_fds == 1 and outbox.flush(master)
        assert not is_open(first)  # the message holds it now
        assert (outbox.sent_fds, outbox.queued_fds, outbox.unconfirmed_fds) == (1, 0, 1)
        with contextlib.suppress(BlockingIOError):
            while True:
                master.send(encode(FrameKind.PING))  # fill the socket: the next hand-off cannot go
        outbox.put(FrameKind.HANDOFF, pack_ids([2]), [second], tag="what the caller knows")
        outbox.put(FrameKind.STOP)
        assert not outbox.flush(master)
        assert outbox.clear() == [(Frame(FrameKind.HANDOFF, pack_ids([2]), (second,)), "what the caller knows")]
        assert is_open(second) and outbox.queued_fds == 0
        os.close(second)
    finally:
        os.close(read_end)
        os.close(write_end)


def test_hand_offs_a_gone_reader_never_touched_are_told_apart_from_those_it_took() -> None:
    """Rule 4: descriptors read back from the reader's end belong to the frames it read no byte of."""
    master, worker = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    pipes = [os.pipe() for _ in range(6)]
    with master, worker:
        outbox = Outbox()
        frames = []
        for ids in ([0], [1, 2], [3, 4, 5]):  # three hand-offs, each with a message behind it
            outbox.put(FrameKind.HANDOFF, pack_ids(ids), [os.dup(pipes[n][1]) for n in ids], tag=tuple(ids))
            outbox.put_message(FrameKind.MESSAGE, b"m" * 10, 1 << 20)
            frames.append(encode(FrameKind.HANDOFF, pack_ids(ids), len(ids)))
            assert outbox.flush(master)
        message = len(encode(FrameKind.MESSAGE, b"m" * 10))
        # The reader takes the first hand-off and its message whole, then 3 bytes of the second.
        for size in (len(frames[0]) + message, 3):
            _, ancillary, _, _ = worker.recvmsg(size, socket.CMSG_SPACE(64 * 4))
            for fd in array.array("i", ancillary[0][2]):
                os.close(fd)
        outbox.forget_read(unread_bytes(worker))
        assert outbox.unconfirmed_fds == 5  # the first frame was read whole: forgotten
        # The reader is gone; what is left comes back.
        unread, fds = read_back(worker)
        assert unread == len(frames[1]) - 3 + message + len(frames[2]) + message
        ((frame, tag),), lost = outbox.unread_hand_offs(unread, fds)
        assert tag == (3, 4, 5)  # what the caller said of them comes back with them
        assert lost == 2  # the second frame's descriptors went with its first 3 bytes
        assert frame.kind is FrameKind.HANDOFF and unpack_ids(frame.payload) == (3, 4, 5)
        for conn_id, fd in zip((3, 4, 5), frame.fds, strict=True):
            os.write(fd, bytes([conn_id]))
            os.close(fd)
            assert os.read(pipes[conn_id][0], 1) == bytes([conn_id])
        assert read_back(worker) == (0, [])
    for read_end, write_end in pipes:
        os.close(read_end)
        os.close(write_end)


def test_read_back_descriptors_that_match_no_frame_are_refused() -> None:
    outbox = Outbox()
    with pytest.raises(ProtocolError, match="1 descriptors read back for unread hand-offs carrying 0"):
        outbox.unread_hand_offs(8, [99])


def test_count_payloads_are_one_u32_and_nothing_else() -> None:
    from sticky_server.protocol.frames import pack_count, unpack_count

    assert pack_count(7) == b"\x00\x00\x00\x07"
    assert unpack_count(Frame(FrameKind.CLOSED, pack_count(2**32 - 1), ())) == 2**32 - 1
    for payload in (b"", b"\x00" * 3, b"\x00" * 5):
        with pytest.raises(ProtocolError, match=f"CLOSED frame with a {len(payload)} byte payload .4 expected."):
            unpack_count(Frame(FrameKind.CLOSED, payload, ()))
