"""What a user's worker is: any object with ``add_connection(sock)``, or one of the base classes."""

from __future__ import annotations

import inspect
import socket
from typing import Protocol, runtime_checkable

__all__ = ["AsyncWorker", "ConnectionHandler", "Worker", "check_worker", "is_async_worker"]


@runtime_checkable
class ConnectionHandler(Protocol):
    """Anything ``work()`` accepts: an object with ``add_connection(sock)``."""

    def add_connection(self, sock: socket.socket) -> object: ...


class _HTTPServing:
    """What both base classes say about the HTTP server a worker runs."""

    def close_each_response(self) -> bool:
        """``route_by`` names a key (cookie, header, query, path): make each HTTP response end its connection.

        Only the first request of a connection is routed by its key, so each request
        must come on a connection of its own (``Connection: close``), or one for
        another key on a kept-alive connection is served where the first one was.
        Called before the first connection (and ``start``); return True once arranged. The adapters do; this
        default cannot, and the worker logs a warning saying so.
        """
        return False


class Worker(_HTTPServing):
    """Optional base class for worker objects; any object with ``add_connection`` works.

    Subclass it, build your server in ``__init__`` (without a listening socket:
    the master owns that), and give it each connection in ``add_connection``.
    """

    def add_connection(self, sock: socket.socket) -> None:
        """Take ownership of a connected, blocking socket whose peer is the client.

        Called on the thread that called ``work()``, once per connection routed to
        this worker. No byte of the connection has been read. A TCP socket comes with
        ``TCP_NODELAY`` on, as web servers set it. Hand the socket to
        your server and return quickly: the next connection waits for this call.
        If it raises, the error is logged and the socket is closed.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement add_connection(sock)")

    def stop(self) -> None:
        """Called once when this worker is told to stop; finish in-flight work and return.

        The master waits up to its ``graceful_timeout`` for the process to exit.
        """


def check_worker(worker: object) -> ConnectionHandler:
    """Return ``worker`` if it has a callable ``add_connection``; raise TypeError naming what is missing."""
    add_connection = getattr(worker, "add_connection", None)
    kind = type(worker).__name__
    if add_connection is None:
        raise TypeError(
            f"work() needs an object with an add_connection(sock) method; {kind} has none. "
            "Add one, or subclass sticky_server.Worker."
        )
    if not callable(add_connection):
        raise TypeError(
            f"work() needs add_connection to be a method taking a socket; {kind}.add_connection "
            f"is a {type(add_connection).__name__}."
        )
    return worker  # type: ignore[return-value]


class AsyncWorker(_HTTPServing):
    """Base class for a worker that serves connections on an asyncio event loop.

    ``work()`` runs the loop (or ``await sticky.serve(worker)`` on yours). Override
    ``start`` to set the server up on the loop, ``add_connection`` to serve one
    socket, ``stop`` to finish and run the framework's shutdown hooks.
    """

    async def start(self) -> None:
        """Runs on the loop before the first connection; if it raises, the worker fails to boot."""

    async def add_connection(self, sock: socket.socket) -> None:
        """Serve ``sock`` (connected, no byte read), e.g. with ``loop.connect_accepted_socket``.

        Runs as a task per connection on the worker's loop; if it raises, the
        error is logged and the socket closed.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement add_connection(sock)")

    async def stop(self) -> None:
        """Stop: finish requests in flight, run shutdown hooks. Budget: ``sticky_server.time_left_to_stop()``."""


def is_async_worker(worker: object) -> bool:
    """True when ``worker`` runs on an event loop: an AsyncWorker, or async def start/add_connection/stop."""
    if isinstance(worker, AsyncWorker):
        return True
    return any(inspect.iscoroutinefunction(getattr(worker, name, None)) for name in ("start", "add_connection", "stop"))
