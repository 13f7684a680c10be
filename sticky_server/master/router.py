"""Where connections go now: every link, each slot's current one, the alive set, the guarded pick, the parked queue.

The router keeps every live worker process's link (``links``) and knows, from the
supervisor, which is each slot's current one. The alive set is derived: the slots
whose current worker takes connections (the supervisor says which states do, the
link which of its own conditions, master rules 3, 6 and 7, allow it). Whoever
changes one of those tells the router (``changed``, or ``mark_dirty`` for the
supervisor's decisions), and the set is recomputed once, before the next pick or
the next look at it; ``generation`` counts the changes, for those that follow it
(the kernel's program, the accepting listeners). The user's balancer hears of every
change and picks among the alive slots (``guarded_pick``). Connections no slot can
take now wait in ``parked``, oldest first, and the loop routes them again at the end
of its pass.
"""

from __future__ import annotations

import logging
from collections import deque
from collections.abc import Sequence
from typing import overload

from ..balancer import Balancer, ClientInfo, WorkerSet
from ..sessions import SessionBalancer
from ..util.throttle import ThrottledLog
from .guarded_pick import GuardedBalancer
from .link import FULL, NO_ROOM, Link, Owed
from .process import WorkerProcess
from .supervisor import Supervisor

__all__ = ["LiveCounts", "Router"]

logger = logging.getLogger("sticky_server.master")

# Workers at their descriptor ceiling are logged at most once per this many seconds.
NO_ROOM_LOG_INTERVAL = 10.0


class LiveCounts(Sequence[int]):
    """``WorkerSet.connections``: the live connections of each slot's current worker, read from its link.

    A view, not a copy, so it never needs updating: a reload's finishing worker
    (no longer current) does not count, and a slot without a worker counts 0.
    """

    def __init__(self, router: Router) -> None:
        self._router = router

    def __len__(self) -> int:
        return self._router.size

    @overload
    def __getitem__(self, index: int) -> int: ...

    @overload
    def __getitem__(self, index: slice) -> list[int]: ...

    def __getitem__(self, index: int | slice) -> int | list[int]:
        if isinstance(index, slice):
            return [self[slot] for slot in range(len(self))[index]]
        link = self._router.current_link(range(len(self))[index])
        return 0 if link is None else link.live


class Router:
    """The routing state of the master (module docstring)."""

    def __init__(self, supervisor: Supervisor, balancer: Balancer) -> None:
        self._supervisor = supervisor
        self.balancer = GuardedBalancer(balancer)
        self._sessions = balancer if isinstance(balancer, SessionBalancer) else None
        self.links: dict[WorkerProcess, Link] = {}  # every live process's link
        self._current: dict[int, Link] = {}  # each slot's current worker's link, as the supervisor says
        self._workers = WorkerSet(supervisor.size, (), LiveCounts(self))
        self._alive: frozenset[int] = frozenset()
        self._dirty = True
        self.generation = 0  # counts changes of the alive set (or of the number of slots)
        self.parked: deque[Owed] = deque()  # waiting for a slot: none could take them, or their worker left
        self._no_room_log = ThrottledLog(
            logger,
            logging.WARNING,
            "%d time(s) a worker reached its descriptor ceiling (latest: worker %d, %d live connections, "
            "limit %d); its clients go to other workers until some close. Raise the workers' limit "
            "(`ulimit -n`, LimitNOFILE= under systemd)",
            NO_ROOM_LOG_INTERVAL,
        )

    @property
    def size(self) -> int:
        return self._supervisor.size

    def mark_dirty(self) -> None:
        """The workers may have changed (a supervisor decision, a link added or closed)."""
        self._dirty = True

    def changed(self, link: Link, left: int = 0) -> None:
        """``link``'s routability changed; ``left`` says what took it out of routing (``FULL``, ``NO_ROOM``)."""
        self._dirty = True
        if left & FULL:
            logger.warning(
                "worker %d has %d connections it has not taken yet; routing its clients elsewhere until it catches up",
                link.worker.slot,
                link.unread(),
            )
        if left & NO_ROOM:
            self._no_room_log.note(1, link.worker.slot, link.live, link.descriptor_limit)

    @property
    def workers(self) -> WorkerSet:
        if self._dirty:
            self._refresh()
        return self._workers

    @property
    def alive(self) -> frozenset[int]:
        if self._dirty:
            self._refresh()
        return self._alive

    @property
    def current(self) -> dict[int, Link]:
        """Each slot's current worker's link (do not keep it: it is rebuilt when the workers change)."""
        if self._dirty:
            self._refresh()
        return self._current

    def current_link(self, slot: int) -> Link | None:
        return self.current.get(slot)

    def pick(self, client: ClientInfo) -> int | None:
        """An alive slot for ``client`` (the user's balancer's choice, guarded); None when none is alive."""
        if self._dirty:
            self._refresh()
        return self.balancer.pick(client, self._workers, self._alive)

    def route(self, entry: Owed) -> Link | None:
        """Owe ``entry`` to the link of its slot; None when no slot can take it now (then it is parked)."""
        slot = self.pick(entry[2])
        if slot is None:
            self.parked.append(entry)
            return None
        link = self._current[slot]
        left = link.route(entry)
        if left:
            self.changed(link, left)
        return link

    def closed(self, link: Link, count: int) -> None:
        """The worker of ``link`` closed ``count`` connections: its balancer hears it if it is current."""
        counted, back = link.closed(count)
        if self.current.get(link.worker.slot) is link:
            self.balancer.connections_closed(link.worker.slot, counted)
        if back:
            self.changed(link)

    def _refresh(self) -> None:
        """Read the current links from the supervisor and recompute the alive set (the balancer hears of a change)."""
        supervisor = self._supervisor
        links = self.links
        current = {}
        for slot, worker in supervisor.current.items():
            link = links.get(worker)
            if link is not None:
                current[slot] = link
        for slot, link in current.items():
            if self._sessions is not None and self._current.get(slot, link) is not link:
                self._sessions.forget(slot)  # a new worker: the old one's sessions went with it
        self._current = current
        self._dirty = False
        alive = tuple(
            slot
            for slot, link in sorted(current.items())
            if link.takes_connections and supervisor.takes_connections(link.worker)
        )
        size = supervisor.size
        if alive != self._workers.alive or size != self._workers.size:
            self._workers = WorkerSet(size, alive, self._workers.connections)
            self._alive = frozenset(alive)
            self.generation += 1
            self.balancer.workers_changed(self._workers)
