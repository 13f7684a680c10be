"""Must hold 5: SIGTERM/SIGINT stop everything and exit 0; a killed master takes its workers with it."""

from __future__ import annotations

import signal
import time

import pytest

from .conftest import StartApp
from .harness import pid_alive, request, wait_until


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signal_stops_workers_and_exits_zero(start_app: StartApp, steering: str, signum: int) -> None:
    server = start_app({"APP_STEERING": steering})
    address = server.wait_listening()
    request(address)
    workers = server.worker_pids()
    assert len(workers) == 3

    server.send_signal(signum)

    assert server.wait_exit(timeout=30) == 0
    assert wait_until(lambda: not any(pid_alive(pid) for pid in workers), timeout=5)
    assert server.count(r"exited with code 0") == 3


def test_workers_exit_when_the_master_is_killed(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering})
    server.wait_listening()
    workers = server.worker_pids()
    assert len(workers) == 3

    server.send_signal(signal.SIGKILL)
    killed_at = time.monotonic()
    server.wait_exit(timeout=10)

    assert wait_until(lambda: not any(pid_alive(pid) for pid in workers), timeout=5)
    assert time.monotonic() - killed_at < 2.0


def test_worker_that_does_not_finish_is_killed_after_the_graceful_timeout(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering, "APP_GRACEFUL": "1", "APP_STOP_DELAY": "60", "APP_WORKERS": "2"})
    server.wait_listening()
    started = time.monotonic()

    server.send_signal(signal.SIGTERM)

    assert server.wait_exit(timeout=30) == 0
    assert time.monotonic() - started < 10
    assert server.count(r"did not exit within 1.0 s; killing it") == 2


def test_second_signal_while_stopping_kills_at_once(start_app: StartApp) -> None:
    server = start_app({"APP_GRACEFUL": "60", "APP_STOP_DELAY": "60", "APP_WORKERS": "2"})
    server.wait_listening()
    server.send_signal(signal.SIGTERM)
    server.wait_for("stopping; waiting up to 60.0 s")
    started = time.monotonic()

    server.send_signal(signal.SIGINT)

    assert server.wait_exit(timeout=30) == 0
    assert time.monotonic() - started < 10
