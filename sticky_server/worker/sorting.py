"""Kernel path with ``route_by``: which connections a worker accepted belong to it, and which go elsewhere.

The kernel's program puts each new connection on a slot by IP hash, the same first
choice the master would make. Routed by session, a connection belongs elsewhere when
its first request names a session of another alive slot (or a key whose rendezvous
choice is another slot), or when it starts a new session and this worker already
holds as many sessions as a worker may (``1 + load_factor`` times the average): the
master tells it how many more it may keep (its allowance), and it reports those it
kept (SESSIONS: every ``SESSIONS_REPORT_INTERVAL`` while it keeps new ones, with its
sweep, and at once when it passes new ones on, so that the master places those by
current counts), so both count sessions, not connections. The worker peeks at the first
request head (nothing is read) of each connection it accepts and keeps those that are
its own; the others go to the master with their descriptors (a MOVED frame), which
routes them as it routes what it accepts itself, and no byte goes through it.

A connection whose head is not all there when it is accepted (the listeners defer the
accept until data arrives, so this is rare) goes to the master too: it waits for heads
without blocking anyone. Bytes that are no HTTP request stay (IP hash, as the kernel
chose). The alive set and the allowance come from the master in ROUTES frames.
"""

from __future__ import annotations

import socket
import time

from ..protocol.frames import unpack_routes
from ..proxy import ForwardedHeaderError, may_be_http, request_head_length
from ..sessions import RouteBy, key_hash, rendezvous_order, session_key, slot_in_sid

__all__ = ["SESSIONS_REPORT_INTERVAL", "SessionSorter"]

_PEEK = socket.MSG_PEEK | socket.MSG_DONTWAIT

# While it keeps new sessions, a worker reports them this often (or with its sweep): the master's counts, and
# so every worker's allowance, follow the sessions within about this plus ``ROUTES_INTERVAL``.
SESSIONS_REPORT_INTERVAL = 0.05


class SessionSorter:
    """Whether this worker keeps a connection it accepted (module docstring)."""

    def __init__(self, route: RouteBy, slot: int, max_head: int) -> None:
        self._route = route
        self._slot = slot
        self._max_head = max_head
        self._engineio = route.kind == "engineio"
        self.alive: frozenset[int] = frozenset()  # until the master says: every request stays
        self.allowance: int | None = None  # new sessions it may still keep (None: no word from the master yet)
        self.kept_new = 0  # new sessions kept since the last report to the master
        self.moved = 0
        self._reported_at = time.monotonic()

    def update(self, payload: bytes) -> None:
        """A ROUTES frame from the master."""
        told, self.alive = unpack_routes(payload)
        self.allowance = told - self.kept_new  # those not reported yet were not counted in it

    def report_due(self) -> bool:
        """Whether the new sessions kept since the last report should go to the master now."""
        return self.allowance is not None and (
            self.allowance <= 0 or time.monotonic() - self._reported_at >= SESSIONS_REPORT_INTERVAL
        )

    def reported(self) -> None:
        """The new sessions kept so far went to the master."""
        self.kept_new = 0
        self._reported_at = time.monotonic()

    def keeps(self, sock: socket.socket) -> bool:
        """Whether the connection ``sock`` (accepted, nothing read) is this worker's to serve; counts the moves."""
        try:
            data = sock.recv(self._max_head, _PEEK)
        except OSError:
            data = b""  # nothing yet (or gone): the master waits for its head, or sees it gone
        kept = bool(data) and (self._keeps_engineio(data) if self._engineio else self._keeps_keyed(data))
        if not kept:
            self.moved += 1
        return kept

    def _keeps_engineio(self, data: bytes) -> bool:
        # Only the request line matters (the sid is in its query): no need to wait for, or parse, the rest.
        line_end = data.find(b"\r\n")
        if line_end < 0:
            return not may_be_http(data)  # no HTTP request: IP hash; one coming: the master waits for it
        if data.find(b"sid=", 0, line_end) < 0:
            return self._room_for_new()
        key = session_key(data[: line_end + 2], self._route)
        owner = None if key is None else slot_in_sid(key)
        return owner is None or owner == self._slot or owner not in self.alive

    def _room_for_new(self) -> bool:
        """A new session stays here while the allowance lasts (the master counts it once it hears)."""
        if self.allowance is not None:
            if self.allowance <= 0:
                return False
            self.allowance -= 1
        self.kept_new += 1
        return True

    def _keeps_keyed(self, data: bytes) -> bool:
        if not may_be_http(data):
            return True
        try:
            length = request_head_length(data, self._max_head)
        except ForwardedHeaderError:
            return True  # no HTTP request after all: IP hash, as the kernel chose
        if length is None:
            return False  # the rest is on its way: the master waits for it
        key = session_key(data[:length], self._route)
        if key is None:
            return self._room_for_new()
        alive = self.alive
        return not alive or rendezvous_order(key_hash(key), tuple(sorted(alive)))[0] == self._slot
