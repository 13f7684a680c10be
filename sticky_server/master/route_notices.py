"""Route_by on the kernel path: what the workers are told so that they sort the connections they accept.

Each worker keeps a connection it accepted when its first request is its own (see
``worker.sorting``); for that it needs the alive slots and the new-session bound: the
number of new sessions it may still keep before it passes them to the master to place
(its allowance: see ``sessions.new_session_allowance``). The loop tells every
current worker whenever the alive set changes, and looks every ``ROUTES_INTERVAL``
seconds whether an allowance moved; a worker hears only what is new to it, and
reports the new sessions it kept (SESSIONS).
"""

from __future__ import annotations

import time

from ..protocol.frames import FrameKind, pack_routes
from ..sessions import SessionBalancer
from .router import Router
from .traffic import Traffic

__all__ = ["ROUTES_INTERVAL", "RouteNotices"]

# The workers hear the new-session bound at most this often.
ROUTES_INTERVAL = 0.05


class RouteNotices:
    """Tells the workers the alive slots and the new-session bound (module docstring)."""

    def __init__(self, router: Router, traffic: Traffic, sessions: SessionBalancer) -> None:
        self._router = router
        self._traffic = traffic
        self._sessions = sessions
        self.next_due: float | None = None

    def tell(self) -> None:
        """Send each current worker what changed for it; look again ``ROUTES_INTERVAL`` from now."""
        self.next_due = time.monotonic() + ROUTES_INTERVAL
        alive = self._router.workers.alive
        if not alive:
            return
        for slot, link in self._router.current.items():
            payload = pack_routes(self._sessions.allowance(slot, alive), alive)
            if link.told_routes != payload and link.connected:
                link.told_routes = payload
                self._traffic.put(link.worker, FrameKind.ROUTES, payload)
