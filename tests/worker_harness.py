"""A hand-driven master for the worker runtime's in-process tests (test_worker, test_async_worker)."""

from __future__ import annotations

import os
import signal
import socket
import threading
from collections.abc import Callable

from sticky_server.protocol.frames import WORKER_SENDS, Frame, FrameKind
from sticky_server.protocol.outbox import Outbox
from sticky_server.protocol.wire import FrameReader


class Master:
    """The master's end of a control socketpair, driven by hand."""

    def __init__(self) -> None:
        self.sock, self.worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(10)
        self.reader = FrameReader(WORKER_SENDS)
        self.frames: list[Frame] = []

    def send(self, kind: FrameKind, payload: bytes = b"", fds: list[int] | None = None) -> None:
        outbox = Outbox()
        outbox.put(kind, payload, fds or [])
        assert outbox.flush(self.sock)

    def next_frame(self) -> Frame:
        while not self.frames:
            frames, closed = self.reader.read_from(self.sock)
            assert not closed, "the worker closed its control socket"
            self.frames += frames
        return self.frames.pop(0)

    def frames_until_closed(self) -> list[Frame]:
        """Every frame the worker sends from now until it closes its end."""
        while True:
            frames, closed = self.reader.read_from(self.sock)
            self.frames += frames
            if closed:
                frames, self.frames = self.frames, []
                return frames

    def close(self) -> None:
        self.sock.close()
        self.worker_end.close()


def tcp_pair(source: str = "127.0.0.5") -> tuple[socket.socket, socket.socket]:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname(), timeout=10, source_address=(source, 0))
        accepted, _ = listener.accept()
    return client, accepted


def run_until_sigterm(master: Master, run: Callable[[], object]) -> None:
    """Call ``run`` in the main thread (where a runtime installs its handlers); SIGTERM once the worker is ready.

    Checks that the SIGTERM handler in place before is back afterwards.
    """

    def send_sigterm_when_ready() -> None:
        master.next_frame()
        os.kill(os.getpid(), signal.SIGTERM)

    helper = threading.Thread(target=send_sigterm_when_ready)
    helper.start()
    previous = signal.getsignal(signal.SIGTERM)
    run()
    helper.join(10)
    assert signal.getsignal(signal.SIGTERM) == previous
