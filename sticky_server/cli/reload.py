"""``--reload``: watch the app's files and send the master SIGHUP when one changes.

SIGHUP is the production reload: new workers take over slot by slot, so a client
keeps its worker slot across the reload, as it would in production. The watcher is
watchfiles (uvicorn's) when installed, else a poll of modification times once a
second. It runs on a daemon thread of the master, which never imports the app.
"""

from __future__ import annotations

import fnmatch
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path

__all__ = ["POLL_SECONDS", "WATCHED_SUFFIXES", "Reloader"]

logger = logging.getLogger("sticky_server.reload")

POLL_SECONDS = 1.0
# watchfiles yields at least this often (milliseconds): its first yield says the watch is in place.
READY_TIMEOUT_MS = 200
WATCHED_SUFFIXES = (".py",)
_SKIPPED_FOLDERS = {".git", "__pycache__", ".venv", "venv", "node_modules", ".mypy_cache", ".ruff_cache"}


class Reloader:
    """Calls ``on_change(paths)`` (default: SIGHUP to this process) after files under ``folders`` change.

    ``include`` / ``exclude``: glob patterns on a file's name or its path (uvicorn's
    ``--reload-include`` / ``--reload-exclude``); ``*.py`` is always included unless excluded.
    """

    def __init__(
        self,
        folders: Iterable[str],
        on_change: Callable[[list[Path]], None] | None = None,
        include: Iterable[str] = (),
        exclude: Iterable[str] = (),
    ) -> None:
        self.folders = [Path(folder).resolve() for folder in folders]
        self.include = ["*" + suffix for suffix in WATCHED_SUFFIXES] + list(include)
        self.exclude = list(exclude)
        self.on_change = on_change or _sighup_self
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sticky-reload", daemon=True)

    def start(self) -> None:
        """Watch from a thread of its own; it says so (INFO) once a change would be seen."""
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(POLL_SECONDS * 2)

    def _announce(self, how: str) -> None:
        logger.info(
            "reloading the workers when a file matching %s under %s changes (%s)",
            " ".join(self.include),
            _listed(self.folders),
            how,
        )

    def _run(self) -> None:
        try:
            import watchfiles
        except ImportError:
            self._poll()
            return
        watching = watchfiles.watch(
            *self.folders,
            stop_event=self._stop,
            watch_filter=self._filter,
            yield_on_timeout=True,  # the first (empty) yield says the watch is in place
            rust_timeout=READY_TIMEOUT_MS,
        )
        announced = False
        for changes in watching:
            if not announced:
                self._announce("watchfiles")
                announced = True
            if changes:
                self._changed(sorted({Path(path) for _, path in changes}))

    def _filter(self, change: object, path: str) -> bool:
        return self._watched(Path(path))

    def _watched(self, path: Path) -> bool:
        if _SKIPPED_FOLDERS.intersection(path.parts):
            return False
        if any(path.match(pattern) or fnmatch.fnmatch(path.name, pattern) for pattern in self.exclude):
            return False
        return any(path.match(pattern) or fnmatch.fnmatch(path.name, pattern) for pattern in self.include)

    def _poll(self) -> None:
        seen = self._snapshot()
        self._announce(f"polling every {POLL_SECONDS:g} s (pip install watchfiles to be told at once)")
        while not self._stop.wait(POLL_SECONDS):
            now = self._snapshot()
            changed = sorted(path for path in now.keys() | seen.keys() if now.get(path) != seen.get(path))
            seen = now
            if changed:
                self._changed(changed)

    def _snapshot(self) -> dict[Path, int]:
        found: dict[Path, int] = {}
        for folder in self.folders:
            for root, folders, files in os.walk(folder):
                folders[:] = [name for name in folders if name not in _SKIPPED_FOLDERS]
                for name in files:
                    path = Path(root, name)
                    if self._watched(path):
                        try:
                            found[path] = path.stat().st_mtime_ns
                        except OSError:
                            continue  # removed meanwhile
        return found

    def _changed(self, paths: list[Path]) -> None:
        logger.info("%s changed: reloading the workers", _listed(paths))
        self.on_change(paths)


def _listed(paths: list[Path]) -> str:
    names = [str(path) for path in paths[:3]]
    return ", ".join(names) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")


def _sighup_self(paths: list[Path]) -> None:
    time.sleep(0.05)  # an editor that saves in steps: let it finish
    os.kill(os.getpid(), signal.SIGHUP)
