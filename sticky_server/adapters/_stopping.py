"""How long an adapter waits for requests in flight when its worker is told to stop."""

from __future__ import annotations

from ..server import time_left_to_stop

__all__ = ["STOP_MARGIN", "shutdown_budget"]

# Kept back from the master's deadline so the framework's shutdown hooks still run before the kill.
STOP_MARGIN = 1.0


def shutdown_budget(shutdown_timeout: float | None) -> float:
    """``shutdown_timeout`` if given, else what the master still allows, less ``STOP_MARGIN``."""
    if shutdown_timeout is not None:
        return shutdown_timeout
    return max(0.0, time_left_to_stop() - STOP_MARGIN)
