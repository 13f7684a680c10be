"""Route_by on the kernel path: what the workers are told so that they sort the connections they accept.

Each worker keeps a connection it accepted when its first request is its own (see
``worker.sorting``); for that it needs the alive slots and the new-session bound: the
live connections past which it passes new sessions to the master to place. The loop
tells every current worker whenever the alive set changes, and looks every
``ROUTES_INTERVAL`` seconds whether the bound moved (the loads change with every
connection, so not at each one); a worker hears only what is new to it.
"""

from __future__ import annotations

import time

from ..protocol.frames import FrameKind, pack_routes
from ..sessions import session_bound
from .router import Router
from .traffic import Traffic

__all__ = ["ROUTES_INTERVAL", "RouteNotices"]

# The workers hear the new-session bound at most this often.
ROUTES_INTERVAL = 0.05


class RouteNotices:
    """Tells the workers the alive slots and the new-session bound (module docstring)."""

    def __init__(self, router: Router, traffic: Traffic, load_factor: float) -> None:
        self._router = router
        self._traffic = traffic
        self._load_factor = load_factor
        self.next_due: float | None = None

    def tell(self) -> None:
        """Send each current worker what changed for it; look again ``ROUTES_INTERVAL`` from now."""
        self.next_due = time.monotonic() + ROUTES_INTERVAL
        workers = self._router.workers
        if not workers.alive:
            return
        loads = workers.connections
        bound = session_bound(sum(loads[slot] for slot in workers.alive), len(workers.alive), self._load_factor)
        payload = pack_routes(bound, workers.alive)
        for link in self._router.current.values():
            if link.told_routes != payload and link.connected:
                link.told_routes = payload
                self._traffic.put(link.worker, FrameKind.ROUTES, payload)
