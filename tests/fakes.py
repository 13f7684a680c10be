"""The one stand-in for ``spawn_worker`` the unit tests use: no process runs, the control socket is real."""

from __future__ import annotations

import itertools
import socket
import subprocess
from collections.abc import Sequence
from unittest.mock import Mock

from sticky_server.master.process import WorkerProcess


class FakeSpawn:
    """Called as ``spawn_worker`` is; each call makes a ``WorkerProcess`` whose process is a mocked ``Popen``
    (``poll()`` None: running) and whose control socket is one end of a real socketpair (the other end, the
    worker's, is in ``worker_ends`` by slot). ``fail``: raise it instead. ``extras``: what each call was given
    beyond the command (credentials, listeners)."""

    def __init__(self, first_pid: int = 5000, fail: OSError | None = None) -> None:
        self._pids = itertools.count(first_pid)
        self.fail = fail
        self.extras: list[dict[str, object]] = []
        self.worker_ends: dict[int, socket.socket] = {}
        self._sockets: list[socket.socket] = []

    def __call__(self, slot: int, command: Sequence[str], cwd: str, now: float, **extra: object) -> WorkerProcess:
        self.extras.append(extra)
        if self.fail is not None:
            raise self.fail
        process = Mock(spec=subprocess.Popen, pid=next(self._pids))
        process.poll.return_value = None
        master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        master_end.setblocking(False)
        self._sockets += [master_end, worker_end]
        self.worker_ends[slot] = worker_end
        return WorkerProcess(slot=slot, process=process, control=master_end, started_at=now)

    def close(self) -> None:
        for sock in self._sockets:
            sock.close()
