"""Queued work done a slice of time at a time, so that a long queue never holds up the loop that owns it.

The master's loop (a worker's frames, calls from other threads) and the worker's
loop (received messages) both take from their queues for about ``SLICE_SECONDS``,
then turn once (accepts, hand-offs, other workers) before the next slice. A
hand-off that arrives behind a flood of messages therefore waits about a slice, not
for the flood.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol, TypeVar

__all__ = ["SLICE_SECONDS", "run_for"]

# Long enough that the loop's own turn (a select, a few checks) is small beside it,
# short enough that a hand-off waiting behind it is not noticed.
SLICE_SECONDS = 0.0005

_Item = TypeVar("_Item")
_Item_co = TypeVar("_Item_co", covariant=True)


class _Queue(Protocol[_Item_co]):
    """What ``run_for`` takes from: a ``collections.deque``, or ``outbox.DropOldestQueue``."""

    def __len__(self) -> int: ...

    def popleft(self) -> _Item_co: ...


def run_for(items: _Queue[_Item], handle: Callable[[_Item], object], seconds: float | None) -> None:
    """Take items from the front of ``items`` and ``handle`` them in order for about ``seconds`` (None: all).

    At least one item is handled, however long it takes; the rest stay queued for the
    next slice. An exception from ``handle`` ends the slice and propagates (the item
    it was handling is already taken).
    """
    deadline = None if seconds is None else time.monotonic() + seconds
    while items:
        handle(items.popleft())
        if deadline is not None and time.monotonic() >= deadline:
            return
