"""Master rule 7: keeping the kernel path right while the workers come and go.

The master holds every slot's listener but accepts only from those the kernel's program
leaves out. The keeper decides, from the links and the alive set, and returns what the
loop must do; it never calls back into the loop:

- ``follow(alive)``: the program includes the alive slots (every slot until each
  slot's first worker is ready); the listeners of the others are ``drained``, judged
  by the alive set, not by the program, which is stale if the kernel refused a new one.
- ``check(now, links)`` every ``QUEUE_CHECK_INTERVAL`` seconds: a slot whose listeners
  hold ``BACKED_UP_QUEUE`` connections at two looks and no fewer at the second is
  *backed up* (its link says so) until its worker is heard from again; a listener that
  stopped listening is replaced (its slot is returned: its worker must be replaced too,
  so that it inherits the new one).
- ``refuse_growth()``: why a new slot cannot join the groups now (a socket not ours is
  in one), or None.
"""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol

from ..util.throttle import ThrottledLog
from . import KernelSteering

__all__ = ["QUEUE_CHECK_INTERVAL", "Checked", "SteeringKeeper"]

logger = logging.getLogger("sticky_server.master")

QUEUE_CHECK_INTERVAL = 0.1
FAULT_LOG_INTERVAL = 10.0


class QueueWatched(Protocol):
    """What the keeper reads and marks on a slot's link (``link.Link``)."""

    backed_up: bool
    queue_seen: int

    def look_at_queue(self, length: int, now: float) -> bool: ...

    def heard_since_backed_up(self) -> bool: ...

    @property
    def pid(self) -> int: ...


class Checked:
    """What a check found: whether the alive set may have changed, and the slots whose workers must go."""

    def __init__(self, changed: bool = False, replace: Sequence[int] = ()) -> None:
        self.changed = changed
        self.replace = list(replace)


class SteeringKeeper:
    """Master rule 7 over one ``KernelSteering`` (module docstring)."""

    def __init__(
        self,
        steering: KernelSteering,
        local: Sequence[tuple[str, int]],
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.steering = steering
        self._local = list(local)  # each group's bound address, as ClientInfo.local says it
        self._clock = clock
        self.drained: dict[socket.socket, tuple[str, int]] = {}
        self.next_check: float | None = None
        self._fault_log = ThrottledLog(
            logger,
            logging.ERROR,
            "the kernel refused the steering program %d time(s) (latest: %s); the previous one stays, and the "
            "master drains the listeners of every slot that cannot take connections",
            FAULT_LOG_INTERVAL,
        )

    def follow(self, alive: tuple[int, ...]) -> None:
        """The program over ``alive`` (ascending, not empty to change it); ``drained`` the listeners of the rest."""
        steering = self.steering
        if alive and alive != steering.steered:
            try:
                steering.steer(alive)
            except (OSError, ValueError) as exc:
                self._fault_log.note(1, exc)
        steered = set(steering.steered) & set(alive) if alive else set(steering.steered)
        self.drained = {
            listener: local
            for group, local in zip(steering.groups, self._local, strict=True)
            for slot, listener in enumerate(group.listeners)
            if slot not in steered
        }
        if self.next_check is None:
            self.next_check = self._clock() + QUEUE_CHECK_INTERVAL

    def check(self, now: float, links: Mapping[int, QueueWatched]) -> Checked:
        """Broken listeners first, then the queues: what changed and which slots' workers must be replaced."""
        self.next_check = now + QUEUE_CHECK_INTERVAL
        replace = self._replace_broken(links)
        changed = bool(replace)
        for slot, link in links.items():
            if link.backed_up:
                changed |= link.heard_since_backed_up()
                continue
            if slot not in self.steering.steered:
                continue
            if link.look_at_queue(self.steering.queue_length(slot), now):
                changed = True
                logger.warning(
                    "worker %d (pid %d) leaves %d connections waiting on its listener; routing its clients "
                    "elsewhere until it is heard from again",
                    slot,
                    link.pid,
                    link.queue_seen,
                )
        return Checked(changed, replace)

    def check_soon(self) -> None:
        """Something failed on a listener: look at every listener at the next turn of the loop."""
        self.next_check = self._clock()

    def stop_checking(self) -> None:
        self.next_check = None

    def _replace_broken(self, links: Mapping[int, QueueWatched]) -> list[int]:
        broken = self.steering.broken()
        for slot in broken:
            link = links.get(slot)
            logger.error(
                "worker %d's listener stopped listening (shut down or disconnected by a process holding it%s); "
                "replacing the listener, and the worker so that it takes the new one",
                slot,
                f": worker pid {link.pid}?" if link is not None else "",
            )
            try:
                self.steering.replace(slot)
            except (OSError, ValueError) as exc:
                self._fault_log.note(1, exc)
        if len(broken) > 1:
            logger.error(
                "%d listeners stopped at once: the kernel's order of the group may differ from the one assumed; "
                "restart the server if clients are not on their usual workers",
                len(broken),
            )
        return broken

    def refuse_growth(self) -> str | None:
        """Why SIGTTIN must not add a slot now, or None."""
        stranger = self.steering.strangers()
        if stranger is None:
            return None
        return f"{stranger}; a new worker's clients would go to it. Stop that process, then send SIGTTIN again"

    def every_listener(self) -> list[tuple[socket.socket, tuple[str, int]]]:
        """Every listener of every group, with its bound address."""
        groups = zip(self.steering.groups, self._local, strict=True)
        return [(listener, local) for group, local in groups for listener in group.listeners]
