"""The small parts both sides use: signals as loop events, wake-ups, time slices, rate-limited logs."""

from __future__ import annotations

import logging
import os
import select
import signal
import threading
from collections import deque

import pytest
from pytest_mock import MockerFixture

from sticky_server.util.signals import SignalQueue
from sticky_server.util.slices import run_for
from sticky_server.util.throttle import ThrottledLog
from sticky_server.util.waker import Waker


def readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_a_signal_is_a_byte_on_the_wake_up_socket_and_drain_names_it_once() -> None:
    before = signal.getsignal(signal.SIGUSR2)
    queue = SignalQueue([signal.SIGUSR2])
    try:
        assert queue.installed and not readable(queue.fileno())
        os.kill(os.getpid(), signal.SIGUSR2)
        os.kill(os.getpid(), signal.SIGUSR2)
        assert select.select([queue.fileno()], [], [], 5)[0]
        assert queue.drain() == [signal.SIGUSR2, signal.SIGUSR2]
        assert queue.drain() == [] and not readable(queue.fileno())
    finally:
        queue.restore()
    assert signal.getsignal(signal.SIGUSR2) == before


def test_a_burst_of_wakes_from_many_threads_is_one_byte_and_none_is_lost_after_a_clear() -> None:
    waker = Waker()
    try:
        threads = [threading.Thread(target=waker.wake) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(5)
        assert readable(waker.fileno())
        assert len(os.read(waker.fileno(), 100)) == 1  # one byte for the burst
        waker.clear()
        waker.wake()  # after the clear: a new byte
        assert readable(waker.fileno())
        waker.clear()
        assert not readable(waker.fileno())
    finally:
        waker.close()
    waker.wake()  # closed: a late wake from another thread is harmless


def test_a_slice_handles_at_least_one_item_and_leaves_the_rest_in_order() -> None:
    items = deque(range(5))
    seen: list[int] = []
    run_for(items, seen.append, 0.0)
    assert seen == [0] and list(items) == [1, 2, 3, 4]
    run_for(items, seen.append, None)
    assert seen == [0, 1, 2, 3, 4] and not items


def test_an_error_ends_the_slice_with_its_item_taken() -> None:
    items = deque([1, 2, 3])

    def handle(item: int) -> None:
        if item == 2:
            raise ValueError(item)

    with pytest.raises(ValueError):
        run_for(items, handle, None)
    assert list(items) == [3]


def test_a_throttled_log_counts_every_event_and_writes_once_per_interval(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    now = [100.0]
    mocker.patch("sticky_server.util.throttle.time.monotonic", lambda: now[0])
    log = ThrottledLog(logging.getLogger("sticky_server.test"), logging.WARNING, "%d event(s) at %s", 10.0)
    with caplog.at_level(logging.WARNING, "sticky_server.test"):
        log.note(1, "a")
        log.note(3, "b")
        now[0] += 9.9
        log.note(1, "c")
        now[0] += 0.1
        log.note(2, "d")
    assert [record.getMessage() for record in caplog.records] == ["1 event(s) at a", "6 event(s) at d"]
