"""The master's pid file and the stats file beside it, written and read the way careful daemons do.

A pid file decides which process a command such as ``sticky-server status`` signals,
often as root, in a directory others may write to. So:

- it is written to a private temporary file made in the same directory (``mkstemp``:
  ``O_CREAT|O_EXCL``, a random name, so never a link someone planted) and renamed
  over its name: a link there is replaced, not followed, and readers never see half
  a file;
- it is read with ``O_NOFOLLOW`` and trusted only if it is a regular file owned by
  the reader or root;
- the master refuses to start on a pid file that is a link, belongs to another
  user, or names a master still running, and removes it at exit only if it still
  names itself;
- the master holds an advisory lock (``flock``) on the file for as long as it runs,
  so "a master is running with this file" is a fact the kernel keeps, not a guess
  from the pid: after a crash the pid may name any process, and then ``status``
  signals nothing and the next start is not blocked.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..errors import PidFileError

__all__ = [
    "master_holds",
    "read_own_file",
    "read_pid",
    "remove_pid_file",
    "stats_file_of",
    "stats_writer",
    "write_file",
    "write_pid_file",
]


def stats_file_of(pid_file: Path) -> Path:
    """Where the master writes its stats on SIGUSR1: beside the pid file."""
    return pid_file.with_name(pid_file.name + ".stats")


def write_file(path: Path, text: str, locked: bool = False) -> int | None:
    """Replace ``path`` with ``text`` through a private temporary file renamed over it (module docstring).

    ``locked``: the file is locked (``flock``) before its name points at it, and the open
    descriptor holding the lock is returned, to keep for as long as the lock should hold.
    """
    fd, temporary = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        if locked:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.fchmod(fd, 0o644)
        with open(fd, "w", closefd=False) as file:
            file.write(text)
        os.rename(temporary, path)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise
    if locked:
        return fd
    os.close(fd)
    return None


def read_own_file(path: Path, what: str) -> str:
    """The text of ``path``, refused (``PidFileError``) unless it is a regular file of this user's or root's.

    No link is followed: a file another user could write must not decide what a
    root command does, nor make it read another file.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise PidFileError(f"{what} {path} is a symbolic link; refusing to follow it") from None
        raise
    with os.fdopen(fd) as file:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PidFileError(f"{what} {path} is not a regular file")
        if info.st_uid not in (os.geteuid(), 0):
            raise PidFileError(
                f"{what} {path} belongs to uid {info.st_uid}, not to you or root; refusing to trust it. "
                "Keep pid files in a directory only the server's user can write (e.g. /run/APP/)"
            )
        return file.read()


def read_pid(path: Path) -> int | None:
    """The pid in ``path`` (see ``read_own_file``), or None if it holds no positive number."""
    text = read_own_file(path, "the pid file")
    try:
        pid = int(text.strip())
    except ValueError:
        return None
    return pid if pid > 0 else None


def master_holds(path: Path) -> bool:
    """True while a running master holds ``path``'s lock (it does from ``write_pid_file`` until it exits)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    finally:
        os.close(fd)
    return False


def write_pid_file(path: Path) -> int:
    """Write this process's pid to ``path`` and lock it; the lock's descriptor, to keep open while serving.

    ``PidFileError`` for a link, another user's file, or a file a running master holds.
    """
    try:
        pid = read_pid(path)
    except FileNotFoundError:
        pid = None
    if pid is not None and pid != os.getpid() and master_holds(path):
        raise PidFileError(f"--pid {path}: a master (pid {pid}) is already running with this pid file; stop it first")
    lock = write_file(path, f"{os.getpid()}\n", locked=True)
    assert lock is not None
    return lock


def remove_pid_file(path: Path, lock: int | None = None) -> None:
    """Remove ``path`` and its stats file if the pid file still names this process; release ``lock``."""
    with contextlib.suppress(OSError, PidFileError):
        if read_pid(path) == os.getpid():
            for each in (path, stats_file_of(path)):
                with contextlib.suppress(FileNotFoundError):
                    each.unlink()
    if lock is not None:
        os.close(lock)


def stats_writer(path: Path) -> Callable[[dict[str, Any]], None]:
    """An ``on_stats`` handler that writes the stats to ``path`` as JSON (see ``write_file``)."""

    def write(stats: dict[str, Any]) -> None:
        write_file(path, json.dumps(stats, indent=2) + "\n")

    return write
