"""When a slot whose worker exited starts again: back-off for quick failures, a halt for a slot that never starts.

A worker that was ready and lived ``HEALTHY_UPTIME`` restarts at once; one that
failed quickly waits ``BACKOFF_FIRST`` doubled per failure in a row, up to
``BACKOFF_MAX``. ``MAX_BOOT_FAILURES`` failed starts in a row (workers that exited
before they were ready) stop the server with the reason.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from ..errors import WorkerBootError
from .decisions import Halt
from .process import WorkerProcess

__all__ = ["BACKOFF_FIRST", "BACKOFF_MAX", "HEALTHY_UPTIME", "MAX_BOOT_FAILURES", "RestartPolicy", "halt"]

logger = logging.getLogger("sticky_server.supervisor")

BACKOFF_FIRST = 0.1
BACKOFF_MAX = 10.0
# A worker that was ready and lived this long counts as healthy: its slot restarts at once.
HEALTHY_UPTIME = 1.0
# Workers of one slot that die before they are ready this many times in a row stop the server.
MAX_BOOT_FAILURES = 5


def halt(what: str) -> Halt:
    """Stop the server: ``what`` went wrong (the workers' own error is above it in the output)."""
    return Halt(WorkerBootError(f"{what}. Its error is printed above; fix it and start again."))


@dataclass
class RestartPolicy:
    """When a slot starts again after its worker exited."""

    first: float = BACKOFF_FIRST
    maximum: float = BACKOFF_MAX
    healthy_uptime: float = HEALTHY_UPTIME
    failures: dict[int, int] = field(default_factory=dict)  # quick failures in a row, per slot
    boot_failures: dict[int, int] = field(default_factory=dict)  # failed starts in a row, per slot

    def delay(self, slot: int, was_ready: bool, uptime: float) -> float:
        """Seconds to wait before starting ``slot`` again; records the outcome."""
        if was_ready and uptime >= self.healthy_uptime:
            self.failures[slot] = 0
            return 0.0
        failures = self.failures.get(slot, 0) + 1
        self.failures[slot] = failures
        return float(min(self.first * 2.0 ** (failures - 1), self.maximum))

    def ready(self, slot: int) -> None:
        """A worker of ``slot`` became ready: its failed starts are forgotten."""
        self.boot_failures[slot] = 0

    def after_exit(self, worker: WorkerProcess, how: str, now: float) -> float | Halt:
        """The current worker of its slot exited while the server runs: seconds until the slot starts again,
        or Halt after ``MAX_BOOT_FAILURES`` failed starts in a row. Logs which."""
        slot = worker.slot
        if worker.ready_at is None:
            self.boot_failures[slot] = self.boot_failures.get(slot, 0) + 1
        phase = "" if worker.ready_at is not None else " before it was ready"
        if self.boot_failures.get(slot, 0) >= MAX_BOOT_FAILURES:
            logger.error(
                "worker %d (pid %d) %s%s: %d failed starts in a row", slot, worker.pid, how, phase, MAX_BOOT_FAILURES
            )
            return halt(
                f"the workers of slot {slot} failed to start {MAX_BOOT_FAILURES} times in a row "
                f"(the last {how}), so the server stopped"
            )
        uptime = now - worker.started_at
        delay = self.delay(slot, worker.ready_at is not None, uptime)
        failures = self.failures.get(slot, 0)
        streak = f" ({failures} quick failures in a row)" if failures > 1 else ""
        logger.warning(
            "worker %d (pid %d) %s%s after %.1f s; restarting it in %.1f s%s",
            slot,
            worker.pid,
            how,
            phase,
            uptime,
            delay,
            streak,
        )
        return delay
