"""One worker process: how it is started, how its end is described.

A worker is the entry script run again (``sys.executable`` plus the interpreter's
original arguments, so ``python app.py`` and ``python -m pkg.app`` both work), in
the directory the program started in, in a session of its own (a terminal's
Ctrl-C reaches the master only; the master decides how workers stop). It inherits
one descriptor beyond stdio, its end of a fresh control socketpair, and on the
kernel path its slot's listeners too; their numbers are in the environment (see
``environment``). The master keeps that end open
as well (``WorkerProcess.worker_end``): hand-offs the worker never read outlive it
there (master rule 2). With ``user``/``group`` it runs with those ids and no
supplementary groups.
"""

from __future__ import annotations

import enum
import errno
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..protocol.environment import CONTROL_FD_ENV, LISTENER_FDS_ENV, WORKER_SLOT_ENV

__all__ = [
    "Launcher",
    "SpawnFunction",
    "WorkerProcess",
    "WorkerState",
    "describe_exit",
    "describe_spawn_error",
    "entry_command",
    "spawn_worker",
]


class WorkerState(enum.Enum):
    """Where a worker process is in its life; the supervisor's table says what moves it."""

    STARTING = "starting"
    READY = "ready"
    HUNG = "hung"
    STOPPING = "stopping"


@dataclass(eq=False)
class WorkerProcess:
    """One running worker process and the master's ends of its control socketpair.

    The master's loop closes both: ``control`` when it lets go of the worker's link,
    and ``worker_end`` (its copy of the worker's end, never read while the worker
    lives) once it has read back what the worker left there. ``state`` and
    ``ready_at`` are the supervisor's to set.
    """

    slot: int
    process: subprocess.Popen[bytes]
    control: socket.socket
    started_at: float
    worker_end: socket.socket | None = None
    state: WorkerState = WorkerState.STARTING
    ready_at: float | None = None  # when it said READY

    @property
    def pid(self) -> int:
        return self.process.pid


def entry_command() -> list[str]:
    """The command that runs this program again: the interpreter, its options, the script or -m module."""
    return [sys.executable, *sys.orig_argv[1:]]


def spawn_worker(
    slot: int,
    command: Sequence[str],
    cwd: str,
    now: float,
    *,
    user: int | None = None,
    group: int | None = None,
    listeners: Sequence[socket.socket] = (),
) -> WorkerProcess:
    """Start one worker process for ``slot``; raises OSError if the process cannot be created.

    With ``user``/``group`` (numeric ids) the worker runs with those ids and no
    supplementary groups: the master may bind a privileged port, workers may not.
    ``listeners``: the slot's own listeners, on the kernel path (``steering``).
    """
    master_end, worker_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        env = dict(os.environ)
        env[CONTROL_FD_ENV] = str(worker_end.fileno())
        env[WORKER_SLOT_ENV] = str(slot)
        if listeners:
            env[LISTENER_FDS_ENV] = ",".join(str(listener.fileno()) for listener in listeners)
        credentials: dict[str, Any] = {}
        if group is not None:
            credentials.update(group=group, extra_groups=[])
        if user is not None:
            credentials["user"] = user
        process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=env,
            pass_fds=(worker_end.fileno(), *(listener.fileno() for listener in listeners)),
            start_new_session=True,
            **credentials,
        )
    except BaseException:
        master_end.close()
        worker_end.close()
        raise
    master_end.setblocking(False)
    return WorkerProcess(slot=slot, process=process, control=master_end, started_at=now, worker_end=worker_end)


def describe_spawn_error(error: OSError, command: Sequence[str], user: int | None = None) -> str:
    """Why the OS refused to start a worker, and the fix, in one line."""
    reason = os.strerror(error.errno) if error.errno else str(error)
    if error.errno == errno.EAGAIN:
        return (
            f"{reason}: the system or this user ran out of processes; start fewer workers or raise the limit "
            "(`ulimit -u`, TasksMax= under systemd)"
        )
    if error.errno == errno.ENOMEM:
        return f"{reason}: not enough memory for another process; start fewer workers"
    if error.errno in (errno.EACCES, errno.EPERM, errno.ENOENT):
        who = "the master's user" if user is None else f"user {user}"
        return (
            f"{reason} ({error.filename or command[0]}): {who} must be able to run {command[0]} and read the app "
            "(install them where that user can, or run the workers as another user)"
        )
    return reason


def describe_exit(returncode: int) -> str:
    """'exited with code 3' or 'was killed by SIGKILL'."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


SpawnFunction = Callable[..., WorkerProcess]


@dataclass(slots=True)
class Launcher:
    """How the supervisor starts a worker process: the command, where, as whom, and (kernel path) its listeners."""

    command: list[str]
    cwd: str
    spawn: SpawnFunction = spawn_worker
    credentials: dict[str, int] = field(default_factory=dict)  # user and group ids
    listeners_for: Callable[[int], Sequence[socket.socket]] | None = None  # a slot's own listeners

    def launch(self, slot: int, now: float) -> WorkerProcess:
        """A new worker process for ``slot``; raises OSError if the OS refuses."""
        extra: dict[str, object] = dict(self.credentials)
        if self.listeners_for is not None:
            extra["listeners"] = self.listeners_for(slot)
        return self.spawn(slot, self.command, self.cwd, now, **extra)

    def error(self, slot: int, error: OSError) -> str:
        """'could not start worker N: why, and the fix'."""
        return (
            f"could not start worker {slot}: {describe_spawn_error(error, self.command, self.credentials.get('user'))}"
        )
