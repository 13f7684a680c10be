"""Checks of the numbers a user gives (seconds, counts), one clear error before anything starts.

A NaN slips past every comparison (``nan <= 0`` is False), and infinity or a huge
number only fails deep inside a ``select`` or a ``listen`` call; both are refused
here, naming the setting.
"""

from __future__ import annotations

import math

__all__ = ["MAX_SECONDS", "check_count", "check_seconds"]

# 31 days: longer than any timeout a server means, short enough for every clock call.
MAX_SECONDS = 31 * 24 * 3600.0


def check_seconds(name: str, value: object, *, zero_allowed: bool) -> float:
    """``value`` as a finite number of seconds, above 0 (or 0 or more), at most ``MAX_SECONDS``."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number of seconds; got {value!r}")
    seconds = float(value)
    low_ok = seconds >= 0 if zero_allowed else seconds > 0
    if not math.isfinite(seconds) or not low_ok or seconds > MAX_SECONDS:
        low = "0 or more" if zero_allowed else "above 0"
        raise ValueError(f"{name} must be a number of seconds, {low} and at most {MAX_SECONDS:.0f}; got {value!r}")
    return seconds


def check_count(name: str, value: object, *, minimum: int, maximum: int, what: str = "a whole number") -> int:
    """``value`` as an int from ``minimum`` to ``maximum``."""
    if isinstance(value, bool) or not isinstance(value, int) or not minimum <= value <= maximum:
        raise ValueError(f"{name} must be {what} from {minimum} to {maximum}; got {value!r}")
    return value
