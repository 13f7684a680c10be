"""gunicorn's server hooks from a ``-c`` file, run where gunicorn runs them.

| hook | runs | with |
|---|---|---|
| ``on_starting(server)`` | master, before it binds | ``server`` |
| ``when_ready(server)`` | master, once it listens and every worker is ready | ``server`` |
| ``post_fork(server, worker)`` | each new worker, before it imports the app | ``server``, ``worker`` |
| ``post_worker_init(worker)`` | each worker, once the app is imported | ``worker`` |
| ``worker_exit(server, worker)`` | each worker, after it stopped serving | ``server``, ``worker`` |
| ``on_exit(server)`` | master, after it stopped | ``server`` |

``server`` and ``worker`` stand in for gunicorn's Arbiter and Worker with the parts
hooks use: ``log`` (a logger), ``pid``, ``cfg`` (the settings), and
``server.num_workers`` / ``worker.age`` (its slot here). A hook that raises is
logged with its traceback, and the server goes on.
"""

from __future__ import annotations

import argparse
import logging
import os
from collections.abc import Callable
from typing import Any

__all__ = ["HookServer", "HookWorker", "run_hook"]

logger = logging.getLogger("sticky_server.hooks")


class HookServer:
    """What gunicorn's hooks receive as ``server``."""

    def __init__(self, args: argparse.Namespace, workers: int, master_pid: int | None = None) -> None:
        self.cfg = args
        self.log = logger
        self.pid = os.getpid() if master_pid is None else master_pid  # the master's, as the Arbiter's
        self.num_workers = workers
        self.proc_name = args.name or args.target


class HookWorker:
    """What gunicorn's hooks receive as ``worker``: this worker process."""

    def __init__(self, args: argparse.Namespace, slot: int) -> None:
        self.cfg = args
        self.log = logger
        self.age = slot
        self.slot = slot
        self.pid = os.getpid()
        self.ppid = os.getppid()


def run_hook(hooks: dict[str, Callable[..., Any]], name: str, *args: object) -> None:
    hook = hooks.get(name)
    if hook is None:
        return
    try:
        hook(*args)
    except Exception:
        logger.exception("the %s hook raised", name)
