"""A log line for events that can repeat fast: counted always, written at most once per interval."""

from __future__ import annotations

import logging
import time

__all__ = ["ThrottledLog"]


class ThrottledLog:
    """``note(n, *args)`` counts ``n`` events and logs ``message`` (with the count first) at most every ``interval``."""

    def __init__(self, logger: logging.Logger, level: int, message: str, interval: float) -> None:
        self._logger = logger
        self._level = level
        self._message = message
        self._interval = interval
        self._count = 0
        self._logged_at = -interval

    def note(self, count: int = 1, *args: object) -> None:
        self._count += count
        now = time.monotonic()
        if now - self._logged_at >= self._interval:
            self._logger.log(self._level, self._message, self._count, *args)
            self._count, self._logged_at = 0, now
