"""The asyncio worker runtime in-process, on real sockets: hand-offs and messages on the loop's thread."""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from typing import Any

import pytest

from sticky_server import AsyncWorker, Worker
from sticky_server.protocol.frames import FrameKind, pack_ids
from sticky_server.protocol.messages import pack_delivery
from sticky_server.worker.asyncio_loop import AsyncWorkerRuntime
from sticky_server.worker.base import is_async_worker
from sticky_server.worker.channel import WorkerChannel
from sticky_server.worker.selector_loop import WorkerRuntime
from sticky_server.worker.session import WorkerSession

from .worker_harness import Master, run_until_sigterm, tcp_pair

TIMEOUT = 10.0


class Recorder(AsyncWorker):
    """Records on which thread each call ran; the first ``refuse_first`` connections raise."""

    def __init__(self, refuse_first: int = 0) -> None:
        self.refuse_first = refuse_first
        self.sockets: list[socket.socket] = []
        self.threads: set[int] = set()
        self.started = False
        self.stopped = False

    async def start(self) -> None:
        self.started = True
        self.threads.add(threading.get_ident())

    async def add_connection(self, sock: socket.socket) -> None:
        self.threads.add(threading.get_ident())
        if self.refuse_first:
            self.refuse_first -= 1
            raise RuntimeError("refused on purpose")
        self.sockets.append(sock)

    async def stop(self) -> None:
        self.threads.add(threading.get_ident())
        self.stopped = True


def run_in_thread(runtime: AsyncWorkerRuntime) -> tuple[threading.Thread, list[int]]:
    """Run the runtime's loop on a new thread; returns the thread and (once running) its ident."""
    ident: list[int] = []

    async def main() -> None:
        ident.append(threading.get_ident())
        await runtime.serve()

    thread = threading.Thread(target=asyncio.run, args=(main(),), daemon=True)
    thread.start()
    return thread, ident


def test_which_workers_run_on_an_event_loop() -> None:
    class Coroutines:
        async def add_connection(self, sock: socket.socket) -> None: ...

    class AsyncStopOnly:
        def add_connection(self, sock: socket.socket) -> None: ...

        async def stop(self) -> None: ...

    class Plain:
        def add_connection(self, sock: socket.socket) -> None: ...

    assert is_async_worker(Recorder()) and is_async_worker(Coroutines()) and is_async_worker(AsyncStopOnly())
    assert not is_async_worker(Plain()) and not is_async_worker(Worker())


def test_hand_offs_arrive_on_the_loop_thread(master: Master) -> None:
    worker = Recorder()
    thread, ident = run_in_thread(AsyncWorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=2)))
    assert master.next_frame().kind is FrameKind.READY
    assert worker.started  # start() ran before READY
    client, accepted = tcp_pair()
    client.sendall(b"intact")
    master.send(FrameKind.HANDOFF, pack_ids([7]), [accepted.detach()])
    master.send(FrameKind.STOP)
    thread.join(TIMEOUT)
    assert not thread.is_alive() and worker.stopped
    assert worker.threads == set(ident)  # start, add_connection and stop: all on the loop's thread
    (sock,) = worker.sockets
    with sock, client:
        assert sock.getpeername() == client.getsockname()
        assert sock.recv(6) == b"intact"


def test_a_raising_add_connection_closes_its_socket_and_the_next_is_served(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    worker = Recorder(refuse_first=1)
    thread, _ = run_in_thread(AsyncWorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)))
    master.next_frame()
    (client1, accepted1), (client2, accepted2) = tcp_pair("127.0.0.8"), tcp_pair("127.0.0.9")
    with caplog.at_level(logging.ERROR, logger="sticky_server"):
        master.send(FrameKind.HANDOFF, pack_ids([1, 2]), [accepted1.detach(), accepted2.detach()])
        client1.settimeout(TIMEOUT)
        assert client1.recv(10) == b""  # closed by the runtime
        master.send(FrameKind.STOP)
        thread.join(TIMEOUT)
    record = next(r for r in caplog.records if "add_connection raised" in r.getMessage())
    assert f"closed the connection from 127.0.0.8:{client1.getsockname()[1]}" in record.getMessage()
    assert [s.getpeername()[0] for s in worker.sockets] == ["127.0.0.9"]
    for sock in (client1, client2, *worker.sockets):
        sock.close()


def test_a_slow_add_connection_does_not_hold_up_the_next_and_is_cancelled_at_stop(master: Master) -> None:
    class HoldsFirst(Recorder):
        held = False

        async def add_connection(self, sock: socket.socket) -> None:
            if not self.held:
                self.held = True
                await asyncio.Event().wait()  # never set: a handshake that does not finish
            self.sockets.append(sock)

    worker = HoldsFirst()
    thread, _ = run_in_thread(AsyncWorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0)))
    master.next_frame()
    (client1, accepted1), (client2, accepted2) = tcp_pair("127.0.0.8"), tcp_pair("127.0.0.9")
    master.send(FrameKind.HANDOFF, pack_ids([1]), [accepted1.detach()])
    master.send(FrameKind.HANDOFF, pack_ids([2]), [accepted2.detach()])
    master.send(FrameKind.STOP)
    thread.join(TIMEOUT)
    assert not thread.is_alive()
    assert [s.getpeername()[0] for s in worker.sockets] == ["127.0.0.9"]
    client1.settimeout(TIMEOUT)
    assert client1.recv(10) == b""  # the held one was cancelled and closed at stop
    for sock in (client1, client2, *worker.sockets):
        sock.close()


def test_message_handlers_run_on_the_loop_and_may_be_coroutines(master: Master) -> None:
    channel = WorkerChannel(master.worker_end)
    seen: list[tuple[str, Any, int]] = []
    done = threading.Event()

    def plain(sender: int | None, message: Any) -> None:
        seen.append(("plain", message, threading.get_ident()))

    async def coroutine(sender: int | None, message: Any) -> None:
        await asyncio.sleep(0)
        seen.append(("coroutine", message, threading.get_ident()))
        done.set()

    channel.handlers += [plain, coroutine]
    thread, ident = run_in_thread(AsyncWorkerRuntime(WorkerSession(Recorder(), channel, slot=0)))
    master.next_frame()
    master.send(FrameKind.MESSAGE, pack_delivery(None, b'{"n":1}'))
    assert done.wait(TIMEOUT)
    master.send(FrameKind.STOP)
    thread.join(TIMEOUT)
    assert seen == [("plain", {"n": 1}, ident[0]), ("coroutine", {"n": 1}, ident[0])]


def test_a_coroutine_handler_in_the_selector_runtime_is_an_error_not_a_silent_drop(
    master: Master, caplog: pytest.LogCaptureFixture
) -> None:
    channel = WorkerChannel(master.worker_end)

    async def coroutine(sender: int | None, message: Any) -> None: ...

    channel.handlers.append(coroutine)

    class Plain(Worker):
        def add_connection(self, sock: socket.socket) -> None: ...

    runtime = WorkerRuntime(WorkerSession(Plain(), channel, slot=4))
    thread = threading.Thread(target=runtime.run, daemon=True)
    thread.start()
    master.next_frame()
    master.send(FrameKind.MESSAGE, pack_delivery(None, b"1"))
    master.send(FrameKind.STOP)
    thread.join(TIMEOUT)
    assert "a message handler returned an awaitable, but this worker runs no event loop" in caplog.text


def test_sigterm_stops_the_async_worker_gracefully_and_restores_handlers(master: Master) -> None:
    worker = Recorder()
    runtime = AsyncWorkerRuntime(WorkerSession(worker, WorkerChannel(master.worker_end), slot=0))
    run_until_sigterm(master, lambda: asyncio.run(asyncio.wait_for(runtime.serve(), TIMEOUT)))
    assert worker.stopped
