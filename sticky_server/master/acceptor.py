"""The master's accepting: which listeners the loop watches, accept bursts, the out-of-descriptors pause.

On the master path the master accepts from every bind's listener; on the kernel path
(``steering``) only from the listeners master rule 7 drains: those of the slots the
kernel's program leaves out (``SteeringKeeper.drained``). The loop says whether the
master accepts now (a slot can take connections, none is parked, it is not stopping:
``accept_while``); the acceptor watches exactly the listeners that applies to.

``accept`` yields each connection it takes, numbered, with the ``ClientInfo`` the
balancer is told; the loop routes it (or gives it to the intake) and may stop the
burst early. Out-of-descriptor errors from ``accept`` (EMFILE, ENFILE, ENOBUFS,
ENOMEM) are logged (at most every ``ACCEPT_ERROR_LOG_INTERVAL`` seconds) and
accepting pauses for ``ACCEPT_BACKOFF`` seconds instead of spinning; the clients wait
in the kernel's backlog. A connection aborted before ``accept`` is skipped.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import selectors
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from ..balancer import ClientInfo
from ..listener import ACCEPT_BACKOFF, OutOfDescriptors, accept_waiting
from ..steering.keeper import SteeringKeeper
from ..util.throttle import ThrottledLog

__all__ = ["ACCEPT_ERROR_LOG_INTERVAL", "Acceptor", "listening_address"]

logger = logging.getLogger("sticky_server.master")

# Running out of descriptors, and connections that failed in routing, are logged at most once per this many seconds.
ACCEPT_ERROR_LOG_INTERVAL = 10.0
FAULT_LOG_INTERVAL = 10.0

Local = tuple[str, int]
OnReadable = Callable[[socket.socket, Local, int], None]


def listening_address(name: Any) -> Local:
    """``ClientInfo.local`` for connections that come in on a listener bound to ``name``."""
    return name[:2] if isinstance(name, tuple) else (name, 0)  # a Unix socket: its path


class Acceptor:
    """Watches the listeners the master accepts from and accepts from them (module docstring)."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        listeners: Sequence[socket.socket],
        keeper: SteeringKeeper | None,
        listening: Sequence[Local],
        on_readable: OnReadable,
    ) -> None:
        self._selector = selector
        self._keeper = keeper
        self._own: dict[socket.socket, Local] = (
            {} if keeper is not None else dict(zip(listeners, listening, strict=True))
        )
        self._on_readable = on_readable
        self._watched: set[socket.socket] = set()  # registered in the selector now
        self.accepting = False
        self.paused_until: float | None = None
        self.accepted = 0  # connections accepted so far; the last one's number
        self._error_log = ThrottledLog(
            logger,
            logging.ERROR,
            "accept failed %d time(s): %s; pausing accepts for %.1f s each time; "
            "raise the descriptor limit (`ulimit -n`)",
            ACCEPT_ERROR_LOG_INTERVAL,
        )
        self._fault_log = ThrottledLog(
            logger,
            logging.ERROR,
            "closed %d connection(s) that could not be routed (latest from %s: %s)",
            FAULT_LOG_INTERVAL,
        )

    def accept(self, listener: socket.socket, local: Local, limit: int) -> Iterator[tuple[int, int, ClientInfo]]:
        """Accept up to ``limit`` connections waiting on ``listener``: (number, descriptor, client) each."""
        new_client = tuple.__new__
        try:
            for fd, address in accept_waiting(listener, limit):
                self.accepted += 1
                if type(address) is tuple:
                    # The same tuple ClientInfo(...) builds, without its Python-level __new__.
                    yield self.accepted, fd, new_client(ClientInfo, (address[0], address[1], None, local, None))
                else:
                    yield self.accepted, fd, ClientInfo("", 0, None, local)
        except OutOfDescriptors as exc:
            self._error_log.note(1, os.strerror(exc.errno or 0), ACCEPT_BACKOFF)
            self.paused_until = time.monotonic() + ACCEPT_BACKOFF
            self.accept_while(False)
        except OSError as exc:
            if self._keeper is None:
                raise  # the master's own listener: nothing else can break it
            # A slot's listener, shared with its worker: broken there (master rule 7 replaces it).
            logger.debug("accepting on a kernel-path listener failed: %s", exc)
            self._watch({})
            self._keeper.check_soon()

    def failed(self, fd: int, client: ClientInfo, error: BaseException) -> None:
        """An unexpected error while reading one connection's header or packing its hand-off: close it, log
        (throttled), go on."""
        with contextlib.suppress(OSError):
            os.close(fd)
        self._fault_log.note(1, client.host or "a Unix socket", f"{type(error).__name__}: {error}")
        logger.debug("routing a connection failed", exc_info=error)

    def number(self) -> int:
        """A number for a connection accepted elsewhere (a worker's, moved), counted as accepted."""
        self.accepted += 1
        return self.accepted

    def accept_while(self, should: bool) -> None:
        """Accept now if ``should`` and no pause is on; watch exactly the listeners that takes."""
        self.accepting = should and self.paused_until is None
        if not self.accepting:
            self._watch({})
        else:
            self._watch(self._keeper.drained if self._keeper is not None else self._own)

    def pause_over(self, now: float) -> bool:
        """True when an accept pause ended by ``now`` (the loop then says again whether to accept)."""
        if self.paused_until is not None and self.paused_until <= now:
            self.paused_until = None
            return True
        return False

    def every_listener(self) -> list[tuple[socket.socket, Local]]:
        """Every listener the master holds, with its bound address."""
        if self._keeper is None:
            return list(self._own.items())
        return self._keeper.every_listener()

    def close(self) -> None:
        """Stop accepting and close every listener the master holds."""
        self.accept_while(False)
        for listener, _ in self.every_listener():
            listener.close()

    def _watch(self, listeners: dict[socket.socket, Local]) -> None:
        """Watch exactly ``listeners`` for connections to accept."""
        watched = self._watched
        if len(watched) == len(listeners) and all(listener in listeners for listener in watched):
            return
        for listener in list(watched):
            if listener not in listeners:
                self._selector.unregister(listener)
                watched.discard(listener)
        for listener, local in listeners.items():
            if listener not in watched:
                callback = functools.partial(self._on_readable, listener, local)
                self._selector.register(listener, selectors.EVENT_READ, callback)
                watched.add(listener)
