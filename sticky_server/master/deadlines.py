"""The supervisor's timers: a restart per slot, a kill per process, the next heartbeat, and the earliest of them.

The master's loop sleeps until ``earliest`` and then asks the supervisor what is due
(``Supervisor.due``); the supervisor takes what is due from here.
"""

from __future__ import annotations

from .process import WorkerProcess

__all__ = ["Deadlines"]


class Deadlines:
    """Restarts, kills and the heartbeat, each with the time it is due (module docstring)."""

    def __init__(self) -> None:
        self._restart_at: dict[int, float] = {}
        self._kill_at: dict[WorkerProcess, tuple[float, str]] = {}
        self._heartbeat_at: float | None = None
        self.earliest: float | None = None

    def restart(self, slot: int, when: float) -> None:
        self._restart_at[slot] = when
        self._changed()

    def kill(self, worker: WorkerProcess, when: float, why: str) -> None:
        """Kill ``worker`` at ``when`` if it still runs; ``why`` is logged then."""
        self._kill_at[worker] = (when, why)
        self._changed()

    def heartbeat(self, when: float) -> None:
        self._heartbeat_at = when
        self._changed()

    def kills(self, worker: WorkerProcess) -> bool:
        """Whether a kill of ``worker`` is due some time."""
        return worker in self._kill_at

    def forget_kill(self, worker: WorkerProcess) -> None:
        if self._kill_at.pop(worker, None) is not None:
            self._changed()

    def forget_restart(self, slot: int) -> None:
        if self._restart_at.pop(slot, None) is not None:
            self._changed()

    def forget_restarts(self) -> None:
        self._restart_at.clear()
        self._changed()

    def due_restarts(self, now: float) -> list[int]:
        """The slots whose restart is due at ``now``, in order; forgotten here."""
        due = sorted(slot for slot, when in self._restart_at.items() if when <= now)
        for slot in due:
            del self._restart_at[slot]
        self._changed()
        return due

    def due_kills(self, now: float) -> list[tuple[WorkerProcess, str]]:
        """The processes whose kill is due at ``now``, with why; forgotten here."""
        due = [(worker, why) for worker, (when, why) in self._kill_at.items() if when <= now]
        for worker, _ in due:
            del self._kill_at[worker]
        self._changed()
        return due

    def heartbeat_due(self, now: float) -> bool:
        return self._heartbeat_at is not None and self._heartbeat_at <= now

    def _changed(self) -> None:
        times = [*self._restart_at.values(), *(when for when, _ in self._kill_at.values())]
        if self._heartbeat_at is not None:
            times.append(self._heartbeat_at)
        self.earliest = min(times) if times else None
