"""The worker runtime in-process, on real sockets: delivery, errors, stopping."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_mock import MockerFixture

from sticky_server import Worker
from sticky_server.protocol.frames import WORKER_SENDS, Frame, FrameKind, pack_ids
from sticky_server.protocol.messages import EARLY_FLUSH_BYTES, pack_delivery
from sticky_server.protocol.outbox import Outbox
from sticky_server.protocol.wire import FrameReader
from sticky_server.worker.asyncio_loop import AsyncWorkerRuntime
from sticky_server.worker.base import check_worker
from sticky_server.worker.channel import WorkerChannel
from sticky_server.worker.selector_loop import WorkerRuntime
from sticky_server.worker.session import ORPHAN_EXIT_SECONDS, WorkerSession

from .worker_harness import Master, run_until_sigterm, tcp_pair


class Recorder(Worker):
    def __init__(self, refuse_first: int = 0) -> None:
        self.sockets: list[socket.socket] = []
        self.refuse_first = refuse_first
        self.stopped = threading.Event()

    def add_connection(self, sock: socket.socket) -> None:
        if self.refuse_first:
            self.refuse_first -= 1
            raise RuntimeError("refused on purpose")
        self.sockets.append(sock)

    def stop(self) -> None:
        self.stopped.set()


def start(runtime: WorkerRuntime) -> threading.Thread:
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    return thread


def test_ready_then_an_unread_blocking_socket_of_the_client_and_nothing_sent_back(master: Master) -> None:
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=3)))
    assert master.next_frame().kind is FrameKind.READY
    client, accepted = tcp_pair()
    client.sendall(b"intact")
    accepted.setblocking(False)  # as the master's sockets are

    master.send(FrameKind.HANDOFF, pack_ids([42]), [accepted.detach()])  # the outbox closes the master's copy
    master.send(FrameKind.STOP)
    thread.join(10)
    assert not thread.is_alive() and worker.stopped.is_set()
    assert master.frames_until_closed() == []  # reading a hand-off is taking it: no answer
    (sock,) = worker.sockets
    with sock, client:
        assert sock.getpeername() == client.getsockname()
        assert sock.family == socket.AF_INET and sock.getblocking()
        assert sock.recv(6) == b"intact"


def test_add_connection_raising_is_logged_and_that_socket_closed(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Recorder(refuse_first=1)
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)))
    master.next_frame()
    (client1, accepted1), (client2, accepted2) = tcp_pair("127.0.0.8"), tcp_pair("127.0.0.9")
    with caplog.at_level(logging.ERROR, logger="sticky_server"):
        master.send(FrameKind.HANDOFF, pack_ids([1, 2]), [accepted1.detach(), accepted2.detach()])
        assert client1.recv(10) == b""  # closed by the worker
        master.send(FrameKind.STOP)
        thread.join(10)
    record = next(r for r in caplog.records if "add_connection raised" in r.getMessage())
    assert f"closed the connection from 127.0.0.8:{client1.getsockname()[1]}" in record.getMessage()
    assert record.exc_info is not None and "refused on purpose" in str(record.exc_info[1])
    assert [s.getpeername()[0] for s in worker.sockets] == ["127.0.0.9"]  # the worker kept serving
    for sock in (client1, client2, *worker.sockets):
        sock.close()


def test_master_gone_stops_the_worker_and_arms_the_exit_timer(master: Master, mocker: MockerFixture) -> None:
    exit_soon = mocker.patch("sticky_server.worker.session.exit_soon")
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=1)))
    master.next_frame()
    master.sock.close()
    thread.join(10)
    assert not thread.is_alive() and worker.stopped.is_set()
    exit_soon.assert_called_once_with(ORPHAN_EXIT_SECONDS)


def test_invalid_frame_from_the_master_stops_the_worker(master: Master, caplog: pytest.LogCaptureFixture) -> None:
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=1)))
    master.next_frame()
    master.sock.sendall(b"\xff" * 8)
    thread.join(10)
    assert not thread.is_alive() and worker.stopped.is_set()
    assert "the master sent an invalid frame (unknown frame kind 255)" in caplog.text


def test_hand_offs_sent_together_are_delivered_in_order(master: Master) -> None:
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)))
    master.next_frame()
    pairs = [tcp_pair(f"127.0.0.{20 + index}") for index in range(3)]
    outbox = Outbox()
    outbox.put(FrameKind.HANDOFF, pack_ids([7, 5]), [pairs[0][1].detach(), pairs[1][1].detach()])
    outbox.put(FrameKind.HANDOFF, pack_ids([9]), [pairs[2][1].detach()])
    outbox.put(FrameKind.STOP)
    assert outbox.flush(master.sock)
    thread.join(10)
    assert not thread.is_alive()
    assert [sock.getpeername()[0] for sock in worker.sockets] == ["127.0.0.20", "127.0.0.21", "127.0.0.22"]
    for sock in (*worker.sockets, *(client for client, _ in pairs)):
        sock.close()


def test_a_hand_off_whose_ids_do_not_match_its_descriptors_is_refused(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=2)))
    master.next_frame()
    client, accepted = tcp_pair()
    master.send(FrameKind.HANDOFF, pack_ids([1, 2]), [accepted.detach()])  # two ids, one descriptor
    thread.join(10)
    assert not thread.is_alive() and worker.sockets == []
    assert "hand-off with 16 bytes of ids and 1 descriptors" in caplog.text
    client.settimeout(10)
    assert client.recv(10) == b""  # the worker closed the descriptor it refused: the client sees the end
    client.close()


def test_sigterm_stops_the_worker_gracefully(master: Master) -> None:
    worker = Recorder()
    run_until_sigterm(master, WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)).run)
    assert worker.stopped.is_set()


def test_check_worker_names_what_is_missing() -> None:
    class NoMethod:
        pass

    class NotCallable:
        add_connection = 3

    expected = r"add_connection\(sock\) method; NoMethod has none.*subclass sticky_server\.Worker"
    with pytest.raises(TypeError, match=expected):
        check_worker(NoMethod())
    with pytest.raises(TypeError, match=r"NotCallable\.add_connection is a int"):
        check_worker(NotCallable())
    duck = type("Duck", (), {"add_connection": lambda self, sock: None})()
    assert check_worker(duck) is duck


def test_worker_base_class_requires_add_connection() -> None:
    with pytest.raises(NotImplementedError, match="Worker must implement add_connection"), socket.socket() as sock:
        Worker().add_connection(sock)


def test_a_burst_of_messages_starts_going_out_before_the_loop_turns() -> None:
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    channel = WorkerChannel(worker_end)
    try:
        master_end.setblocking(False)
        reader = FrameReader(WORKER_SENDS)
        payload = b"m" * 1000
        for _ in range(EARLY_FLUSH_BYTES // len(payload) - 1):
            channel.put_message(FrameKind.PUBLISH, payload)
        with pytest.raises(BlockingIOError):
            reader.read_from(master_end)  # a few messages wait for the loop's flush
        for _ in range(3):
            channel.put_message(FrameKind.PUBLISH, payload)
        received: list[Frame] = []
        with contextlib.suppress(BlockingIOError):
            while True:
                received += reader.read_from(master_end)[0]
        # Past EARLY_FLUSH_BYTES the sending call wrote them itself, in order.
        assert len(received) >= EARLY_FLUSH_BYTES // len(payload)
        assert all(frame.kind is FrameKind.PUBLISH and frame.payload == payload for frame in received)
    finally:
        channel.close()
        worker_end.close()
        master_end.close()


class OrderRecorder(Recorder):
    """Records connections and messages in one list, in the order the worker gave them."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[object] = []

    def add_connection(self, sock: socket.socket) -> None:
        super().add_connection(sock)
        self.events.append("connection")


def run_runtime(runtime: WorkerRuntime) -> threading.Thread:
    """Run either runtime on a thread of its own: the selector loop, or asyncio for the async one."""
    if isinstance(runtime, AsyncWorkerRuntime):
        thread = threading.Thread(target=asyncio.run, args=(runtime.serve(),), daemon=True)
        thread.start()
        return thread
    return start(runtime)


def send_messages(master: Master, messages: range) -> None:
    """All of them in one write, so the worker reads them together."""
    outbox = Outbox()
    for n in messages:
        outbox.put_message(FrameKind.MESSAGE, pack_delivery(None, str(n).encode()), 1 << 30)
    assert outbox.flush(master.sock)


@pytest.mark.parametrize("runtime_class", [WorkerRuntime, AsyncWorkerRuntime])
def test_a_hand_off_behind_a_backlog_of_messages_is_taken_within_a_slice(
    master: Master, runtime_class: type[WorkerRuntime]
) -> None:
    worker = OrderRecorder()
    channel = WorkerChannel(master.worker_end)
    runtime = runtime_class(WorkerSession(worker, channel, slot=0))
    runtime.session.slice_seconds = 0.0  # one message per slice: the test counts slices, not time
    client, accepted = tcp_pair()
    last = threading.Event()

    def handler(sender: int | None, message: object) -> None:
        worker.events.append(message)
        if message == 0:  # the master hands a connection off while 49 messages wait in the worker
            master.send(FrameKind.HANDOFF, pack_ids([7]), [os.dup(accepted.fileno())])
        if message == 49:
            last.set()

    channel.handlers.append(handler)
    thread = run_runtime(runtime)
    try:
        assert master.next_frame().kind is FrameKind.READY
        send_messages(master, range(50))
        assert last.wait(10)
        # Taken at the next turn of the loop, not after the whole backlog (it was 51st before).
        assert worker.events.index("connection") <= 2, worker.events
        assert [event for event in worker.events if event != "connection"] == list(range(50))
    finally:
        master.send(FrameKind.STOP)
        thread.join(10)
        for sock in (client, accepted, *worker.sockets):
            sock.close()
    assert not thread.is_alive()


def test_messages_received_before_a_stop_still_reach_the_handlers(master: Master) -> None:
    worker = Recorder()
    channel = WorkerChannel(master.worker_end)
    runtime = WorkerRuntime(WorkerSession(worker, channel, slot=0))
    runtime.session.slice_seconds = 0.0
    seen: list[object] = []
    channel.handlers.append(lambda sender, message: seen.append(message))
    thread = start(runtime)
    master.next_frame()
    send_messages(master, range(20))
    master.send(FrameKind.STOP)
    thread.join(10)
    assert not thread.is_alive() and worker.stopped.is_set()
    assert seen == list(range(20))


def test_a_worker_whose_handlers_fall_behind_drops_its_oldest_messages(
    master: Master, mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    frame_payload = len(pack_delivery(None, b"10"))
    mocker.patch("sticky_server.worker.session.MAX_QUEUED_MESSAGE_BYTES", 5 * frame_payload)
    worker = Recorder()
    channel = WorkerChannel(master.worker_end)
    seen: list[object] = []
    done = threading.Event()

    def handler(sender: int | None, message: object) -> None:
        seen.append(message)
        if message == 49:
            done.set()

    channel.handlers.append(handler)
    thread = start(WorkerRuntime(WorkerSession(worker, channel, slot=4)))
    master.next_frame()
    with caplog.at_level(logging.WARNING, logger="sticky_server"):
        send_messages(master, range(10, 50))  # 40 messages of one size, read at once
        assert done.wait(10)
        master.send(FrameKind.STOP)
        thread.join(10)
    assert seen == list(range(45, 50))  # the newest that fit, in order
    assert "dropped 35 oldest message(s) received by worker 4" in caplog.text


def test_a_handed_off_tcp_socket_has_nagle_off_and_tells_its_protocol(master: Master) -> None:
    """Pins what the hand-off may not skip: TCP_NODELAY, and proto IPPROTO_TCP, not 0 (asyncio checks it)."""
    worker = Recorder()
    thread = start(WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)))
    assert master.next_frame().kind is FrameKind.READY
    client, accepted = tcp_pair()
    master.send(FrameKind.HANDOFF, pack_ids([1]), [accepted.detach()])
    master.send(FrameKind.STOP)
    thread.join(10)
    (sock,) = worker.sockets
    with sock, client:
        assert sock.proto == socket.IPPROTO_TCP
        assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0

        async def wrap() -> int:
            transport, _ = await asyncio.get_running_loop().connect_accepted_socket(asyncio.Protocol, sock)
            try:
                return int(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY))
            finally:
                transport.abort()

        assert asyncio.run(wrap()) != 0


def test_kernel_path_worker_accepts_from_its_own_listener_and_reports_it(master: Master) -> None:
    worker = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        runtime = WorkerRuntime(
            WorkerSession(
                worker, WorkerChannel(master.worker_end), 1, listeners=[listener], report_accepts_at_once=True
            )
        )
        thread = start(runtime)
        assert master.next_frame().kind is FrameKind.READY
        with socket.create_connection(listener.getsockname(), timeout=10) as client:
            frame = master.next_frame()
            assert frame.kind is FrameKind.ACCEPTED and frame.payload == (1).to_bytes(4, "big")
            (sock,) = worker.sockets
            with sock:  # TCP_NODELAY inherited from the listener, the socket blocking, as a hand-off's
                assert sock.getpeername() == client.getsockname() and sock.getblocking()
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        master.send(FrameKind.STOP)
        thread.join(10)
        assert not thread.is_alive() and listener.fileno() == -1  # the worker closed its copy on the stop


def test_out_of_descriptors_pauses_every_listener_once_and_resumes(master: Master, mocker: MockerFixture) -> None:
    from sticky_server.listener import OutOfDescriptors, accept_waiting
    from sticky_server.worker import session as worker_module

    failures = [OutOfDescriptors(24, "Too many open files")] * 2

    def scarce(listener: socket.socket, limit: int) -> Iterator[tuple[int, Any]]:
        if failures:
            raise failures.pop()
        return accept_waiting(listener, limit)

    mocker.patch.object(worker_module, "accept_waiting", scarce)
    worker = Recorder()
    with socket.create_server(("127.0.0.1", 0)) as first, socket.create_server(("127.0.0.1", 0)) as second:
        for listener in (first, second):
            listener.setblocking(False)
        runtime = WorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), 0, listeners=[first, second]))
        clients = [socket.create_connection(listener.getsockname(), timeout=10) for listener in (first, second)]
        thread = start(runtime)  # both listeners are ready in its first select: one pause, not a crash
        assert master.next_frame().kind is FrameKind.READY
        frame = master.next_frame()
        assert frame.kind is FrameKind.NO_ROOM and frame.payload == bytes(4)
        deadline = time.monotonic() + 10
        while len(worker.sockets) < 2 and time.monotonic() < deadline:  # taken once the pause is over
            time.sleep(0.02)
        assert len(worker.sockets) == 2 and thread.is_alive()
        master.send(FrameKind.STOP)
        thread.join(10)
        for sock in (*clients, *worker.sockets):
            sock.close()
