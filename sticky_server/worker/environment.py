"""How a worker process learns that it is one: the variables the master set (``protocol.environment``).

The master re-executes the entry script with two extra environment variables: the
number of the inherited control-socket descriptor and the worker's slot; on the
kernel path (``steering``) a third, the numbers of the slot's own listeners. This
module reads them once and removes them from ``os.environ`` so that programs the
worker starts do not mistake themselves for workers.

A worker also makes itself non-dumpable (Linux ``PR_SET_DUMPABLE`` 0): another
process of the same user can then no longer read its environment or memory,
attach to it, or copy its control socket with ``pidfd_getfd``, and so cannot
inject frames or take connections. (It writes no core file either.) Only root
still can, which is why the workers should run as a user of their own.
"""

from __future__ import annotations

import ctypes
import logging
import os
import socket
import sys
from typing import NamedTuple

from ..errors import WrongProcessError
from ..protocol.environment import CONTROL_FD_ENV, LISTENER_FDS_ENV, MAPPED_PEERS_ENV, WORKER_SLOT_ENV
from .lockdown import lock_down_listeners

__all__ = ["WorkerIdentity", "make_undumpable", "worker_identity"]

logger = logging.getLogger("sticky_server.environment")

_PR_SET_DUMPABLE = 4  # linux/prctl.h


def make_undumpable() -> bool:
    """Linux: ``prctl(PR_SET_DUMPABLE, 0)`` for this process; False where it cannot (other systems)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)  # this process's symbols, libc's among them
        if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) == 0:
            return True
        error = ctypes.get_errno()
    except (OSError, AttributeError) as exc:
        error_text = str(exc)
    else:
        error_text = os.strerror(error)
    logger.warning("could not make worker %d non-dumpable: %s", os.getpid(), error_text)
    return False


class WorkerIdentity(NamedTuple):
    """What a worker process was given by its master."""

    slot: int
    control: socket.socket
    listeners: tuple[socket.socket, ...] = ()  # the slot's own listeners, on the kernel path
    mapped_peers: bool = False  # a listener takes IPv4 clients on IPv6 (MAPPED_PEERS_ENV)


_identity: WorkerIdentity | None = None
_read = False


def worker_identity() -> WorkerIdentity | None:
    """This process's worker identity, or None in a master (or any other program)."""
    global _identity, _read
    if _read:
        return _identity
    fd_text = os.environ.pop(CONTROL_FD_ENV, None)
    slot_text = os.environ.pop(WORKER_SLOT_ENV, None)
    listeners_text = os.environ.pop(LISTENER_FDS_ENV, "")
    mapped_peers = os.environ.pop(MAPPED_PEERS_ENV, "") == "1"
    _read = True
    if fd_text is None:
        return None
    not_ours = "; this process was not started by a sticky_server master (unset the variable)"
    try:
        fd, slot = int(fd_text), int(slot_text or "")
    except ValueError:
        raise WrongProcessError(
            f"{CONTROL_FD_ENV}={fd_text!r} {WORKER_SLOT_ENV}={slot_text!r} are not numbers{not_ours}"
        ) from None
    try:
        control = socket.socket(fileno=fd)
    except OSError:
        raise WrongProcessError(f"{CONTROL_FD_ENV}={fd} is not an open socket{not_ours}") from None
    if control.family != socket.AF_UNIX:
        control.detach()
        raise WrongProcessError(f"{CONTROL_FD_ENV}={fd} is not a Unix socket{not_ours}")
    # Keep it out of anything this worker spawns: only this process talks to the master.
    control.set_inheritable(False)
    listeners = tuple(_listener(text, not_ours) for text in listeners_text.split(",") if text)
    make_undumpable()
    lock_down_listeners([listener.fileno() for listener in listeners])  # before any application code runs
    _identity = WorkerIdentity(slot, control, listeners, mapped_peers)
    return _identity


def _listener(fd_text: str, not_ours: str) -> socket.socket:
    try:
        listener = socket.socket(fileno=int(fd_text))
    except (ValueError, OSError):
        raise WrongProcessError(f"{LISTENER_FDS_ENV} names {fd_text!r}, not an open socket{not_ours}") from None
    listener.set_inheritable(False)
    listener.setblocking(False)
    return listener
