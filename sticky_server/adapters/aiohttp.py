"""Serve an aiohttp ``web.Application`` from a sticky_server worker.

    sticky.work(AiohttpWorker(app))

The application runs on an event loop of its own thread (started here). Each
connection handed to ``add_connection`` is passed to that loop and served with
``loop.connect_accepted_socket(runner.server, sock)``: from then on aiohttp owns the
socket. ``stop()`` runs the application's cleanup (``AppRunner.cleanup``, which
waits for requests in flight) and stops the loop.
"""

from __future__ import annotations

import asyncio
import socket
import threading

from aiohttp import web

from ..worker import Worker

__all__ = ["AiohttpWorker"]

# How long stop() waits for aiohttp's cleanup (the master kills the worker at graceful_timeout anyway).
CLEANUP_SECONDS = 30.0


class AiohttpWorker(Worker):
    """A worker that serves ``app`` (an aiohttp ``web.Application``) on its own event loop."""

    def __init__(self, app: web.Application) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="aiohttp", daemon=True)
        self._thread.start()
        self.runner = web.AppRunner(app)
        asyncio.run_coroutine_threadsafe(self.runner.setup(), self.loop).result()

    def add_connection(self, sock: socket.socket) -> None:
        """Hand ``sock`` to the application's loop (called on the thread that runs ``work()``)."""
        self.loop.call_soon_threadsafe(self._serve, sock)

    def _serve(self, sock: socket.socket) -> None:
        server = self.runner.server
        if server is None:  # cleaned up: the worker is stopping
            sock.close()
            return
        self.loop.create_task(self.loop.connect_accepted_socket(server, sock))

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(CLEANUP_SECONDS)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(CLEANUP_SECONDS)
