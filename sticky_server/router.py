"""Where connections go now: each slot's current link, the alive set, the guarded pick, the parked queue.

The loop tells the router when the workers may have changed (``refresh``): it reads the
supervisor's current worker per slot and keeps the links the loop has for them, and
recomputes the alive set: the slots whose current worker takes connections (the
supervisor says which states do, the link which of its own conditions, the rules 3, 6
and 7, allow it). The user's balancer hears of every change, and picks among the alive
slots (``guarded_pick``). Connections no slot can take now wait in ``parked``, oldest
first, and the loop routes them again at the end of its pass.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping, Sequence
from typing import overload

from .balancer import Balancer, ClientInfo, WorkerSet
from .guarded_pick import GuardedBalancer
from .link import Link, Owed
from .process import WorkerProcess
from .supervisor import Supervisor

__all__ = ["LiveCounts", "Router"]


class LiveCounts(Sequence[int]):
    """``WorkerSet.connections``: the live connections of each slot's current worker, read from its link.

    A view, not a copy, so it never needs updating: a reload's finishing worker
    (no longer current) does not count, and a slot without a worker counts 0.
    """

    def __init__(self, current: dict[int, Link], supervisor: Supervisor) -> None:
        self._current = current
        self._supervisor = supervisor

    def __len__(self) -> int:
        return self._supervisor.size

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[slot] for slot in range(len(self))[index]]
        link = self._current.get(range(len(self))[index])
        return 0 if link is None else link.live


class Router:
    """The routing state of the master (module docstring)."""

    def __init__(self, supervisor: Supervisor, balancer: Balancer) -> None:
        self._supervisor = supervisor
        self.balancer = GuardedBalancer(balancer)
        self.current: dict[int, Link] = {}  # each slot's current worker's link, as the supervisor says
        self.workers = WorkerSet(supervisor.size, (), LiveCounts(self.current, supervisor))
        self.alive: frozenset[int] = frozenset()
        self.parked: deque[Owed] = deque()  # waiting for a slot: none could take them, or their worker left

    def refresh(self, links: Mapping[WorkerProcess, Link]) -> tuple[int, ...]:
        """Read the current links and recompute the alive set (the balancer hears of a change); the alive slots."""
        supervisor = self._supervisor
        current = self.current
        current.clear()  # in place: the message router and the live counts read this same dict
        for slot, worker in supervisor.current.items():
            link = links.get(worker)
            if link is not None:
                current[slot] = link
        alive = tuple(
            slot
            for slot, link in sorted(current.items())
            if link.takes_connections and supervisor.takes_connections(link.worker)
        )
        size = supervisor.size
        if alive != self.workers.alive or size != self.workers.size:
            self.workers = WorkerSet(size, alive, self.workers.connections)
            self.alive = frozenset(alive)
            self.balancer.workers_changed(self.workers)
        return alive

    def pick(self, client: ClientInfo) -> int | None:
        """An alive slot for ``client`` (the user's balancer's choice, guarded); None when none is alive."""
        return self.balancer.pick(client, self.workers, self.alive)
