"""``StickyServer``: the one object a program uses, in the master and in every worker.

The same entry script runs in both. In the master (the process you started),
``is_master`` is True and ``listen()`` binds, starts the workers by running the
script again, and routes connections until stopped. In a worker (started by the
master), ``is_master`` is False and ``work(worker)`` serves what the master sends.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

from .balancer import Balancer, balancer_from
from .environment import worker_identity
from .errors import WrongProcessError
from .listener import DEFAULT_BACKLOG, bind_listener, validate_port
from .master import Dispatcher
from .supervisor import Supervisor
from .worker import WorkerRuntime, check_worker

__all__ = ["DEFAULT_GRACEFUL_TIMEOUT", "StickyServer"]

logger = logging.getLogger("sticky_server")

DEFAULT_GRACEFUL_TIMEOUT = 30.0
_USAGE = "`if sticky.is_master: sticky.listen(port) else: sticky.work(worker)`"

ListeningCallback = Callable[[tuple[str, int]], Any]


class StickyServer:
    """Serve connections from many worker processes, each client always on the same worker.

    ``workers``: how many worker processes (default: the number of CPUs).
    ``balancer``: a ``Balancer`` instance or a built-in name (default ``"ip-hash"``).
    ``graceful_timeout``: seconds workers get to finish when stopping before they are killed.
    ``backlog``: the listen backlog (the kernel caps it at its own maximum).
    """

    def __init__(
        self,
        workers: int | None = None,
        *,
        balancer: Balancer | str = "ip-hash",
        graceful_timeout: float = DEFAULT_GRACEFUL_TIMEOUT,
        backlog: int = DEFAULT_BACKLOG,
    ) -> None:
        if workers is None:
            workers = os.cpu_count() or 1
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 1:
            raise ValueError(f"workers must be a whole number of processes, 1 or more; got {workers!r}")
        if isinstance(graceful_timeout, bool) or not isinstance(graceful_timeout, (int, float)) or graceful_timeout < 0:
            raise ValueError(f"graceful_timeout must be a number of seconds, 0 or more; got {graceful_timeout!r}")
        if isinstance(backlog, bool) or not isinstance(backlog, int) or backlog < 1:
            raise ValueError(f"backlog must be a positive int; got {backlog!r}")
        self.workers = workers
        self.balancer = balancer_from(balancer)
        self.graceful_timeout = float(graceful_timeout)
        self.backlog = backlog
        self._identity = worker_identity()
        self._address: tuple[str, int] | None = None
        self._listening_callbacks: list[ListeningCallback] = []
        self._listen_called = False

    @property
    def is_master(self) -> bool:
        """True in the process that was started by hand; False in the workers it spawns."""
        return self._identity is None

    @property
    def worker_id(self) -> int | None:
        """This worker's slot, 0 to ``workers - 1`` (a respawned worker keeps its slot); None in the master."""
        return None if self._identity is None else self._identity.slot

    @property
    def address(self) -> tuple[str, int] | None:
        """The (host, port) the master listens on, once ``listen()`` has bound it; None before and in workers."""
        return self._address

    def on_listening(self, callback: ListeningCallback) -> ListeningCallback:
        """Call ``callback(address)`` in the master once it listens and every worker is ready.

        Returns ``callback``, so it can be used as a decorator.
        """
        self._listening_callbacks.append(callback)
        return callback

    def listen(self, port: int, host: str | None = None) -> None:
        """Master only: listen on ``port`` and serve until SIGTERM or SIGINT.

        ``port`` 0 picks a free port (see ``address``). ``host`` None (or "") listens on
        every interface, IPv4 and IPv6. Raises ``BindError`` if the address
        cannot be used and ``WorkerBootError`` if a worker dies while starting;
        in every case no worker process is left behind.
        """
        if self._identity is not None:
            raise WrongProcessError(
                f"listen() was called in worker {self._identity.slot}; only the master listens. Use {_USAGE}"
            )
        if self._listen_called:
            raise RuntimeError("listen() was already called on this StickyServer; create one per program")
        validate_port(port)
        self._listen_called = True
        listener = bind_listener(port, host, self.backlog)
        self._address = listener.getsockname()[:2]
        supervisor = Supervisor(self.workers)
        dispatcher = Dispatcher(
            [listener],
            supervisor,
            self.balancer,
            graceful_timeout=self.graceful_timeout,
            on_ready=self._notify_listening,
        )
        try:
            dispatcher.run()
        finally:
            listener.close()
        logger.info("stopped")

    def _notify_listening(self) -> None:
        assert self._address is not None
        for callback in self._listening_callbacks:
            callback(self._address)

    def work(self, worker: object) -> None:
        """Worker only: give every connection routed here to ``worker.add_connection(sock)``.

        Blocks until the master stops this worker (then calls ``worker.stop()`` if
        it has one) or goes away. Raises TypeError at once if ``worker`` has no
        callable ``add_connection``.
        """
        if self._identity is None:
            raise WrongProcessError(f"work() was called in the master process; only workers work. Use {_USAGE}")
        handler = check_worker(worker)
        WorkerRuntime(handler, self._identity.control, self._identity.slot).run()
