"""Worker slots: spawn, reap, respawn with back-off, stop (one process is ``process.py``'s).

Theory of operation
-------------------
Each slot has one *current* process; during a reload or a recycle it also has a
replacement that is starting (it becomes current once ready) and may have old
processes that are finishing. When the current process exits, the slot is
started again after a delay from ``RestartPolicy``: at once if the worker had
been up and healthy, otherwise after an exponentially growing back-off, so a
worker that crashes at start-up costs a few spawns a second at first and one
every ``BACKOFF_MAX`` seconds after that, never a fork loop. A slot whose workers
fail to start ``MAX_BOOT_FAILURES`` times in a row stops the server.

The supervisor never blocks: reaping is ``Popen.poll()`` on each live process
when the master's loop sees SIGCHLD, and respawns are deadlines the loop waits for.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .environment import LAUNCH_CWD
from .process import WorkerProcess, describe_exit, describe_spawn_error, entry_command, spawn_worker

__all__ = [
    "BACKOFF_FIRST",
    "BACKOFF_MAX",
    "HEALTHY_UPTIME",
    "MAX_BOOT_FAILURES",
    "RestartPolicy",
    "Supervisor",
]

logger = logging.getLogger("sticky_server.supervisor")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
# A worker that was ready and lived this long counts as healthy: its slot restarts at once.
HEALTHY_UPTIME = 1.0
# Workers of one slot that die before they are ready this many times in a row stop the server.
MAX_BOOT_FAILURES = 5


@dataclass
class RestartPolicy:
    """When a slot starts again after its worker exited."""

    first: float = BACKOFF_FIRST
    maximum: float = BACKOFF_MAX
    healthy_uptime: float = HEALTHY_UPTIME
    failures: dict[int, int] = field(default_factory=dict)

    def delay(self, slot: int, was_ready: bool, uptime: float) -> float:
        """Seconds to wait before starting ``slot`` again; records the outcome."""
        if was_ready and uptime >= self.healthy_uptime:
            self.failures[slot] = 0
            return 0.0
        failures = self.failures.get(slot, 0) + 1
        self.failures[slot] = failures
        return float(min(self.first * 2.0 ** (failures - 1), self.maximum))


SpawnFunction = Callable[..., WorkerProcess]


class Supervisor:
    """The worker slots of one master: which process runs in each, and when empty ones restart."""

    def __init__(
        self,
        size: int,
        command: Sequence[str] | None = None,
        *,
        cwd: str = LAUNCH_CWD,
        policy: RestartPolicy | None = None,
        spawn: SpawnFunction = spawn_worker,
        clock: Callable[[], float] = time.monotonic,
        user: int | None = None,
        group: int | None = None,
    ) -> None:
        self.size = size
        self.command = list(command) if command is not None else entry_command()
        self.cwd = cwd
        self.policy = policy or RestartPolicy()
        self.workers: dict[int, WorkerProcess] = {}  # the current process of each slot
        self.processes: set[WorkerProcess] = set()  # every live process: current, starting, finishing
        self.restart_at: dict[int, float] = {}
        self.boot_failures: dict[int, int] = {}
        self.restarts: dict[int, int] = {}  # per slot: workers restarted after an unexpected exit
        self.stopping = False
        self._spawn = spawn
        self._clock = clock
        self._credentials = {name: value for name, value in (("user", user), ("group", group)) if value is not None}

    def spawn(self, slot: int) -> WorkerProcess:
        """Start a process for ``slot`` without making it current; raises OSError if it cannot."""
        worker = self._spawn(slot, self.command, self.cwd, self._clock(), **self._credentials)
        self.processes.add(worker)
        logger.info("worker %d started (pid %d)", slot, worker.pid)
        return worker

    def start(self, slot: int) -> WorkerProcess:
        """Start the current process of the empty ``slot``; raises OSError if it cannot."""
        worker = self.spawn(slot)
        self.workers[slot] = worker
        self.restart_at.pop(slot, None)
        return worker

    def promote(self, worker: WorkerProcess) -> WorkerProcess | None:
        """Make ``worker`` its slot's current process; return the one it replaces."""
        previous = self.workers.get(worker.slot)
        self.workers[worker.slot] = worker
        return previous

    def note_ready(self, worker: WorkerProcess) -> None:
        """``worker`` said it is ready: its slot's boot-failure streak ends."""
        worker.ready = True
        self.boot_failures[worker.slot] = 0

    def is_current(self, worker: WorkerProcess) -> bool:
        return self.workers.get(worker.slot) is worker

    def reap(self) -> list[tuple[WorkerProcess, int]]:
        """Collect the processes that exited, with their return codes; empty the slots they held."""
        exited: list[tuple[WorkerProcess, int]] = []
        for worker in list(self.processes):
            returncode = worker.process.poll()
            if returncode is not None:
                self.processes.discard(worker)
                exited.append((worker, returncode))
        return exited

    def schedule_restart(self, worker: WorkerProcess, returncode: int) -> bool:
        """Log the exit of ``worker`` and, if it was a slot's current process, set when the slot restarts.

        Returns False when the slot failed to start ``MAX_BOOT_FAILURES`` times in a row.
        """
        how = describe_exit(returncode)
        current = self.is_current(worker)
        if current:
            del self.workers[worker.slot]
        if self.stopping or not current or worker.slot >= self.size:
            logger.info("worker %d (pid %d) %s", worker.slot, worker.pid, how)
            return True
        if not worker.ready:
            self.boot_failures[worker.slot] = self.boot_failures.get(worker.slot, 0) + 1
        uptime = self._clock() - worker.started_at
        delay = self.policy.delay(worker.slot, worker.ready, uptime)
        phase = "" if worker.ready else " before it was ready"
        failures = self.policy.failures.get(worker.slot, 0)
        streak = f" ({failures} quick failures in a row)" if failures > 1 else ""
        if self.boot_failures.get(worker.slot, 0) >= MAX_BOOT_FAILURES:
            logger.error(
                "worker %d (pid %d) %s%s: %d failed starts in a row",
                worker.slot,
                worker.pid,
                how,
                phase,
                MAX_BOOT_FAILURES,
            )
            return False
        self.restart_at[worker.slot] = self._clock() + delay
        self.restarts[worker.slot] = self.restarts.get(worker.slot, 0) + 1
        logger.warning(
            "worker %d (pid %d) %s%s after %.1f s; restarting it in %.1f s%s",
            worker.slot,
            worker.pid,
            how,
            phase,
            uptime,
            delay,
            streak,
        )
        return True

    def spawn_failed(self, slot: int, error: OSError) -> None:
        """Back off after the OS refused to create a process for ``slot``."""
        delay = self.policy.delay(slot, False, 0.0)
        self.restart_at[slot] = self._clock() + delay
        logger.error("%s; trying again in %.1f s", self.spawn_error(slot, error), delay)

    def spawn_error(self, slot: int, error: OSError) -> str:
        """'could not start worker N: why, and the fix'."""
        why = describe_spawn_error(error, self.command, self._credentials.get("user"))
        return f"could not start worker {slot}: {why}"

    def next_restart(self) -> float | None:
        """The earliest clock time at which an empty slot is due to start."""
        return min(self.restart_at.values()) if self.restart_at else None

    def due_restarts(self) -> list[int]:
        """The empty slots whose restart time has come (the caller starts them)."""
        if not self.restart_at:  # the master asks on every turn of its loop
            return []
        now = self._clock()
        return sorted(slot for slot, when in self.restart_at.items() if when <= now)

    def resize(self, size: int) -> None:
        """Change the number of slots; slots at or above ``size`` are no longer restarted."""
        self.size = size
        for slot in [slot for slot in self.restart_at if slot >= size]:
            del self.restart_at[slot]

    def stop(self) -> None:
        """No more restarts from now on."""
        self.stopping = True
        self.restart_at.clear()

    def kill_all(self, signum: int = signal.SIGKILL) -> None:
        """Send ``signum`` to every live worker process."""
        for worker in self.processes:
            with contextlib.suppress(ProcessLookupError):
                worker.process.send_signal(signum)
