"""The worker's session driven by a selector: the loop of a synchronous worker.

``work(worker)`` runs this loop when the worker is synchronous: it calls
``add_connection`` on the thread that called ``work()``. One selector watches the
control socket, the signal wake-up socket, the channel's waker (other threads'
messages) and, on the kernel path, the slot's own listeners; what each is ready for
is the session's to handle (``session.py``). Between selects the loop writes what
the session queued, gives messages a slice, and sweeps closed connections every
``CLOSE_SWEEP_INTERVAL`` while it holds some. While messages wait it polls instead
of sleeping, so hand-offs are taken between slices.
"""

from __future__ import annotations

import logging
import selectors
import time

from ..util.signals import SignalQueue
from .connections import CLOSE_SWEEP_INTERVAL
from .session import GRACEFUL_SIGNALS, QUICK_SIGNALS, WorkerSession

__all__ = ["WorkerRuntime"]

logger = logging.getLogger("sticky_server.worker")


class WorkerRuntime:
    """Drives a ``WorkerSession`` with a selector (module docstring)."""

    def __init__(self, session: WorkerSession) -> None:
        self.session = session

    def run(self) -> None:
        """Serve hand-offs until told to stop, then call ``worker.stop()`` and return."""
        session = self.session
        control, channel = session.control, session.channel
        signals = SignalQueue(GRACEFUL_SIGNALS | QUICK_SIGNALS)
        selector = selectors.DefaultSelector()
        writing = False
        next_sweep = time.monotonic() + CLOSE_SWEEP_INTERVAL
        try:
            selector.register(control, selectors.EVENT_READ)
            selector.register(signals.fileno(), selectors.EVENT_READ)
            selector.register(channel.waker.fileno(), selectors.EVENT_READ)
            session.announce_ready()
            for listener in session.listeners:
                selector.register(listener, selectors.EVENT_READ, listener)
            while session.stop_reason is None:
                if (writing or channel.pending()) and channel.flush() == writing:
                    writing = not writing
                    selector.modify(control, selectors.EVENT_READ | (selectors.EVENT_WRITE if writing else 0))
                if session.has_messages:
                    timeout: float | None = 0.0  # only look for hand-offs, then go on with the messages
                elif session.has_connections:
                    timeout = max(0.0, next_sweep - time.monotonic())
                else:
                    timeout = None
                if session.accept_paused_until is not None:
                    timeout = self._after_accept_pause(selector, timeout)
                for key, mask in selector.select(timeout):
                    if key.data is not None:  # (one batch can hold several listeners after a pause began)
                        if session.accept_paused_until is None and not session.accept_from(key.data):
                            for listener in session.listeners:
                                selector.unregister(listener)
                    elif key.fileobj is control:
                        if mask & selectors.EVENT_READ:
                            session.on_control_readable()
                    elif key.fileobj == channel.waker.fileno():
                        channel.waker.clear()  # the flush at the top of the loop writes what woke us
                    else:
                        session.on_signals(signals.drain())
                if session.has_messages:
                    session.dispatch_messages(session.slice_seconds)
                if time.monotonic() >= next_sweep:
                    next_sweep = time.monotonic() + CLOSE_SWEEP_INTERVAL
                    session.sweep()
            session.finish_messages()
            if not session.master_lost:
                channel.flush()  # a last try for what the worker sent while stopping
        except (BrokenPipeError, ConnectionResetError):
            session.master_gone("the control socket broke")
        finally:
            selector.close()
            signals.restore()
        stop = session.begin_stop()
        if stop is not None:
            try:
                stop()
            except Exception:
                logger.exception("worker %d: stop() raised", session.slot)
        session.end()

    def _after_accept_pause(self, selector: selectors.BaseSelector, timeout: float | None) -> float | None:
        """Watch the listeners again once an accept pause is over; the select timeout until then."""
        session = self.session
        assert session.accept_paused_until is not None
        left = session.accept_paused_until - time.monotonic()
        if left > 0:
            return left if timeout is None else min(timeout, left)
        session.accept_paused_until = None
        for listener in session.listeners:
            selector.register(listener, selectors.EVENT_READ, listener)
        return timeout
