"""The worker's session driven by the running asyncio loop: hand-offs arrive on the loop that serves them.

``work(worker)`` runs this mode when the worker is asynchronous (see
``is_async_worker``): it runs ``asyncio.run(sticky.serve(worker))``; a program that
already runs a loop awaits ``sticky.serve(worker)`` itself. The control socket, the
signal wake-up socket and the cross-thread waker are watched with
``loop.add_reader``, so every descriptor the master passes becomes a socket on the
loop's own thread, with no thread hop, and message handlers run on the loop too.

The frame handling, the delivery of hand-offs and the close sweeps are the
session's (``session.py``), as with the selector loop; only the loop differs. An ``async def
add_connection`` runs as its own task, so one slow TLS handshake does not hold up
the connections behind it; one that raises has its socket closed and is logged.

Order of a stop: stop reading the control socket, await ``worker.stop()`` (the
adapter finishes requests in flight and runs the framework's shutdown hooks),
then cancel ``add_connection`` tasks still running (those connections were never
served; cancelling closes them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import socket
import ssl
import types
from typing import Any

from ..listener import ACCEPT_BACKOFF
from ..util.signals import SignalQueue
from .connections import CLOSE_SWEEP_INTERVAL
from .session import GRACEFUL_SIGNALS, QUICK_SIGNALS, WorkerSession, describe_peer

__all__ = ["AsyncWorkerRuntime"]

logger = logging.getLogger("sticky_server.worker")

_COROUTINE = types.CoroutineType

# A client that leaves during the TLS handshake or connection set-up is its own business, not an error.
_CLIENT_FAULTS = (ssl.SSLError, ConnectionError, TimeoutError, EOFError)


class AsyncWorkerRuntime:
    """Drives a ``WorkerSession`` with the running asyncio loop (module docstring)."""

    def __init__(self, session: WorkerSession) -> None:
        self.session = session
        session.follow_up = self._run_as_task  # what a user's callback returns may be awaited: a task
        self._tasks: set[asyncio.Future[Any]] = set()
        self._writing = False
        self._dispatching: asyncio.Handle | None = None

    async def serve(self) -> None:
        """Serve hand-offs until told to stop, then await ``worker.stop()`` and return."""
        session = self.session
        self._loop = loop = asyncio.get_running_loop()
        self._stopping: asyncio.Future[None] = loop.create_future()
        start = getattr(session.worker, "start", None)
        if callable(start):
            await start()  # before READY: a failure here is a boot failure
        control, channel = session.control, session.channel
        signals = SignalQueue(GRACEFUL_SIGNALS | QUICK_SIGNALS)
        sweeper: asyncio.TimerHandle | None = None
        try:
            loop.add_reader(control.fileno(), self._event, session.on_control_readable)
            loop.add_reader(signals.fileno(), self._event, lambda: session.on_signals(signals.drain()))
            loop.add_reader(channel.waker.fileno(), self._event, channel.waker.clear)
            self._event(session.announce_ready)
            self._watch_listeners()

            def sweep() -> None:
                nonlocal sweeper
                if session.has_connections:
                    self._event(session.sweep)
                sweeper = loop.call_later(CLOSE_SWEEP_INTERVAL, sweep)

            sweeper = loop.call_later(CLOSE_SWEEP_INTERVAL, sweep)
            await self._stopping
        finally:
            if sweeper is not None:
                sweeper.cancel()
            for fd in (control.fileno(), signals.fileno(), channel.waker.fileno()):
                loop.remove_reader(fd)
            self._unwatch_listeners()
            if self._writing:
                loop.remove_writer(control.fileno())
            if self._dispatching is not None:
                self._dispatching.cancel()
            signals.restore()
        session.finish_messages()
        if not session.master_lost:
            with contextlib.suppress(OSError):
                channel.flush()  # a last try for what the worker sent while stopping
        stop = session.begin_stop()
        if stop is not None:
            try:
                result = stop()
                if inspect.isawaitable(result):
                    await result
            except Exception:
                logger.exception("worker %d: stop() raised", session.slot)
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks)
        session.end()

    def _watch_listeners(self) -> None:
        for listener in self.session.listeners:
            self._loop.add_reader(listener.fileno(), self._event, functools.partial(self._on_listener, listener))

    def _unwatch_listeners(self) -> None:
        for listener in self.session.listeners:
            self._loop.remove_reader(listener.fileno())

    def _on_listener(self, listener: socket.socket) -> None:
        session = self.session
        if session.accept_paused_until is None and not session.accept_from(listener):  # out of descriptors: pause
            self._unwatch_listeners()
            self._loop.call_later(ACCEPT_BACKOFF, self._resume_accepting)

    def _resume_accepting(self) -> None:
        self.session.accept_paused_until = None
        if not self._stopping.done():
            self._watch_listeners()

    def _event(self, handle: Any) -> None:
        """Run one event's handler, then write what it queued and see whether it asked to stop."""
        if self._stopping.done():
            return
        session = self.session
        try:
            handle()
            self._flush()
        except (BrokenPipeError, ConnectionResetError):
            session.master_gone("the control socket broke")
        if session.stop_reason is not None:
            if not self._stopping.done():
                self._stopping.set_result(None)
        elif session.has_messages and self._dispatching is None:
            # The next slice of messages runs in the loop's next turn, after it has looked
            # for I/O: hand-offs read meanwhile do not wait for the rest (selector_loop).
            self._dispatching = self._loop.call_soon(self._event, self._next_slice)

    def _next_slice(self) -> None:
        self._dispatching = None
        self.session.dispatch_messages(self.session.slice_seconds)

    def _flush(self) -> None:
        session = self.session
        done = session.channel.flush()
        if done == self._writing:  # watch for room only while something waits to be written
            self._writing = not done
            if self._writing:
                self._loop.add_writer(session.control.fileno(), self._event, lambda: None)
            else:
                self._loop.remove_writer(session.control.fileno())

    def _run_as_task(self, result: object, what: str, sock: socket.socket | None = None) -> None:
        """An awaitable a user's callback returned runs as a task of its own; anything else is done."""
        if type(result) is _COROUTINE:  # add_connection's usual answer: straight to a task
            task: asyncio.Future[Any] = self._loop.create_task(result)
        elif result is None or not inspect.isawaitable(result):
            return
        else:
            task = asyncio.ensure_future(result)
        self._tasks.add(task)
        task.add_done_callback(lambda done: self._task_done(done, what, sock))

    def _task_done(self, task: asyncio.Future[Any], what: str, sock: socket.socket | None) -> None:
        self._tasks.discard(task)
        slot = self.session.slot
        if task.cancelled():
            if sock is not None:
                sock.close()
            return
        error = task.exception()
        if error is None:
            return
        if sock is None:
            logger.error("worker %d: %s raised", slot, what, exc_info=error)
            return
        if isinstance(error, _CLIENT_FAULTS):
            logger.debug("worker %d: the client left during set-up (%s)", slot, error)
        else:
            peer = describe_peer(sock)
            logger.error("worker %d: %s raised; closed the connection from %s", slot, what, peer, exc_info=error)
        sock.close()
