"""Waking a coroutine that waits on an asyncio future, from its own loop's thread or from any other."""

from __future__ import annotations

import asyncio

__all__ = ["wake"]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


def wake(waiter: asyncio.Future[None]) -> None:
    """Resolve ``waiter`` (if still pending): at once on its loop's thread, else through its loop."""
    loop = waiter.get_loop()
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        _resolve(waiter)
    elif not loop.is_closed():
        loop.call_soon_threadsafe(_resolve, waiter)
