"""What the supervisor decides and the master's loop carries out, and how the server stops.

The supervisor never touches a socket: each event it is told returns a list of these
(``Connect`` a new process's link, ``SendStop``, ``Ping``, ``Listening``, ``Halt``),
and the loop carries them out in order.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from ..errors import WorkerBootError
from .process import WorkerProcess

__all__ = ["Connect", "Decision", "Halt", "Listening", "Ping", "SendStop", "StopMode"]


class StopMode(enum.Enum):
    """How the server stops (master rule 5)."""

    GRACEFUL = "graceful"
    QUICK = "quick"
    KILL = "kill"


@dataclass(frozen=True, slots=True)
class Connect:
    """A new process: open the master's link to it."""

    worker: WorkerProcess


@dataclass(frozen=True, slots=True)
class SendStop:
    """Send STOP to ``worker`` after every hand-off already queued for it."""

    worker: WorkerProcess


@dataclass(frozen=True, slots=True)
class Ping:
    """Send ``worker`` a heartbeat PING."""

    worker: WorkerProcess


@dataclass(frozen=True, slots=True)
class Listening:
    """Every slot's first worker is ready: the server has started."""


@dataclass(frozen=True, slots=True)
class Halt:
    """Workers cannot start: stop the server at once, and raise ``error`` from ``listen()``."""

    error: WorkerBootError


Decision = Connect | SendStop | Ping | Listening | Halt
