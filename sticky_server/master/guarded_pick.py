"""The user's balancer, guarded: a pick that raises, dawdles or names no alive slot costs nothing.

A ``Balancer`` is user code running in the master's loop. Each pick is timed and
checked: an exception, a pick slower than ``PICK_TIME_LIMIT`` or an answer that is
not one of the alive slots is logged once per kind of fault (``balancer X raised ...;
routing such connections by IP hash instead``), and that connection is routed by IP
hash over the same alive slots. The balancer's notifications (``workers_changed``,
``connections_closed``) are guarded the same way.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from ..balancer import PICK_TIME_LIMIT, Balancer, ClientInfo, IPHashBalancer, WorkerSet

__all__ = ["GuardedBalancer"]

logger = logging.getLogger("sticky_server.master")


class GuardedBalancer:
    """``balancer``'s picks and notifications, each fault logged once and its connection routed by IP hash."""

    def __init__(self, balancer: Balancer) -> None:
        self.balancer = balancer
        self._fallback = IPHashBalancer()
        self._faults: set[str] = set()

    def pick(self, client: ClientInfo, workers: WorkerSet, alive: frozenset[int]) -> int | None:
        """An alive slot for ``client``; None when no slot is alive."""
        if not workers.alive:
            return None
        started = time.perf_counter()
        try:
            slot: object = self.balancer.pick(client, workers)
        except Exception as exc:
            self._fault(f"raised {type(exc).__name__}", f"raised {type(exc).__name__}: {exc}")
        else:
            took = time.perf_counter() - started
            if took > PICK_TIME_LIMIT:
                self._fault("was slow", f"took {took * 1000:.0f} ms to pick (over {PICK_TIME_LIMIT * 1000:.0f} ms)")
            elif isinstance(slot, int) and not isinstance(slot, bool) and slot in alive:
                return slot
            else:
                self._fault(
                    f"returned {type(slot).__name__}",
                    f"returned {slot!r}, which is not one of the alive slots {workers.alive}",
                )
        return self._fallback.pick(client, workers)

    def workers_changed(self, workers: WorkerSet) -> None:
        self._notify(self.balancer.workers_changed, workers)

    def connections_closed(self, slot: int, count: int) -> None:
        self._notify(self.balancer.connections_closed, slot, count)

    def _notify(self, hook: Callable[..., None], *args: Any) -> None:
        try:
            hook(*args)
        except Exception as exc:
            self._fault(
                f"{hook.__name__} raised {type(exc).__name__}", f"{hook.__name__}() raised {type(exc).__name__}: {exc}"
            )

    def _fault(self, kind: str, fault: str) -> None:
        """Log a fault of the user's balancer, once per kind."""
        if kind not in self._faults:
            self._faults.add(kind)
            logger.error(
                "balancer %s %s; routing such connections by IP hash instead (logged once)",
                type(self.balancer).__name__,
                fault,
            )
