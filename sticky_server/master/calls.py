"""Calls other threads queue for the master's loop (a message to send, stats to collect), run a slice at a time.

A thread that is not the loop's queues a call and wakes the loop (``Waker``); the
loop runs what is queued, in order, for about ``slices.SLICE_SECONDS`` and comes
back for the rest after a turn (``backlog``), so a flood of calls does not hold up
accepts and hand-offs.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import TypeVar

from ..util.slices import SLICE_SECONDS, run_for
from ..util.waker import Waker

__all__ = ["ThreadCalls"]

T = TypeVar("T")


def _call(call: Callable[[], None]) -> None:
    call()


class ThreadCalls:
    """The queue of calls from other threads into the loop (module docstring)."""

    def __init__(self) -> None:
        self._calls: deque[Callable[[], None]] = deque()  # from other threads, under _lock
        self.backlog: deque[Callable[[], None]] = deque()  # taken from _calls, not yet run
        self._lock = threading.Lock()
        self.waker = Waker()
        self.loop_thread: int | None = None  # the loop's thread while it runs

    def call_soon_threadsafe(self, call: Callable[[], None]) -> None:
        """Run ``call`` in the master's loop: now if this is the loop's thread, else soon."""
        if self.loop_thread == threading.get_ident():
            call()
            return
        if self.loop_thread is None:
            raise RuntimeError("the master is not serving: send messages once listen() runs (e.g. from on_listening)")
        with self._lock:
            self._calls.append(call)
        self.waker.wake()

    def ask(self, question: Callable[[], T], timeout: float) -> T:
        """The answer of ``question()`` run on the loop, waited for from another thread (or run now on it)."""
        if self.loop_thread in (None, threading.get_ident()):
            return question()
        answer: list[T] = []
        done = threading.Event()

        def on_the_loop() -> None:
            answer.append(question())
            done.set()

        self.call_soon_threadsafe(on_the_loop)
        if not done.wait(timeout):
            raise TimeoutError(f"the master's loop did not answer within {timeout} s")
        return answer[0]

    def run(self, mask: int = 0, seconds: float = SLICE_SECONDS) -> None:
        """Run calls queued by other threads, in order, for about ``seconds``; the loop comes back for the rest."""
        self.waker.clear()
        with self._lock:
            fresh, self._calls = self._calls, deque()
        self.backlog.extend(fresh)
        run_for(self.backlog, _call, seconds)

    def close(self) -> None:
        self.loop_thread = None
        self.waker.close()
