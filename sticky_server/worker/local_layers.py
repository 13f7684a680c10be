"""One warning at start when an app served by several workers broadcasts through something that stays in its process.

Django Channels' ``InMemoryChannelLayer`` (what it uses without Redis) and broadcaster's
``memory://`` keep each process's groups and subscribers to themselves: under several
workers a broadcast silently reaches only the clients of the worker that sent it. Each
is named with its sticky replacement, by worker 0: the Channels setting when the worker
starts, broadcaster's memory backend when it first connects (in the app's startup).
Looked for only when the app imported them.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

__all__ = ["process_local_layers", "warn_about_process_local_layers"]

logger = logging.getLogger("sticky_server.worker")

IN_MEMORY_LAYER = "channels.layers.InMemoryChannelLayer"
STICKY_LAYER = "sticky_server.adapters.channels.StickyChannelLayer"


def process_local_layers() -> list[str]:
    """What the app uses that keeps broadcasts in one process, each said with its fix."""
    found = []
    if "channels.layers" in sys.modules and "django.conf" in sys.modules:
        from django.conf import settings

        layers: dict[str, Any] = getattr(settings, "CHANNEL_LAYERS", {}) if settings.configured else {}
        for alias, config in layers.items():
            if isinstance(config, dict) and config.get("BACKEND") == IN_MEMORY_LAYER:
                found.append(
                    f"CHANNEL_LAYERS[{alias!r}] is {IN_MEMORY_LAYER}, which keeps each worker's groups to itself. "
                    f"Set its BACKEND to {STICKY_LAYER!r} (pip install 'sticky-server[channels]')"
                )
    return found


def warn_about_process_local_layers(workers: int, slot: int) -> None:
    """Log each process-local layer once (from slot 0) when there is more than one worker."""
    if workers < 2 or slot != 0:
        return
    for problem in process_local_layers():
        logger.warning("%s: with %d workers, a broadcast reaches only its own worker's clients", problem, workers)
    memory = sys.modules.get("broadcaster._backends.memory")
    backend: Any = getattr(memory, "MemoryBackend", None)
    if backend is not None and not getattr(backend, "_sticky_server_warns", False):
        # A Broadcast("memory://") is made in the app's code and connects in its startup: said when it does.
        connect = backend.connect

        async def warning_connect(self: Any) -> None:
            logger.warning(
                "broadcaster's memory:// keeps each worker's subscribers to itself: with %d workers, a publish "
                "reaches only its own worker's. Use Broadcast(backend=sticky_server.adapters.broadcaster."
                "StickyBackend()) (pip install 'sticky-server[broadcaster]')",
                workers,
            )
            backend.connect = connect
            await connect(self)

        backend.connect = warning_connect
        backend._sticky_server_warns = True
