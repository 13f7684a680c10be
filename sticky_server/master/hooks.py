"""The user's callbacks in the master (``on_message``, ``on_worker_start``, ...): each runs in the master's loop."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["Hooks", "run_hooks"]

logger = logging.getLogger("sticky_server.master")


@dataclass
class Hooks:
    """The callbacks registered on a ``StickyServer``, by event."""

    message: list[Callable[[int, Any], None]] = field(default_factory=list)
    worker_start: list[Callable[[int], None]] = field(default_factory=list)
    worker_exit: list[Callable[[int, int], None]] = field(default_factory=list)
    stats: list[Callable[[dict[str, Any]], None]] = field(default_factory=list)


def run_hooks(hooks: Sequence[Callable[..., None]], *args: Any) -> None:
    """Call each hook with ``args``; one that raises is logged, and the rest still run."""
    for hook in hooks:
        try:
            hook(*args)
        except Exception:
            logger.exception("%s raised", getattr(hook, "__qualname__", hook))
