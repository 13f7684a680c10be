"""Supervision logic without processes: restart delays, reaping, stopping (real processes: integration/)."""

from __future__ import annotations

import errno
import signal
import socket
import sys
from collections.abc import Iterator, Sequence
from unittest.mock import Mock

import pytest
from pytest_mock import MockerFixture

from sticky_server.process import WorkerProcess, describe_exit, describe_spawn_error, entry_command
from sticky_server.supervisor import BACKOFF_FIRST, BACKOFF_MAX, MAX_BOOT_FAILURES, RestartPolicy, Supervisor


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def supervisor(clock: FakeClock) -> Iterator[Supervisor]:
    sockets: list[socket.socket] = []
    pids = iter(range(5000, 6000))

    def spawn(slot: int, command: Sequence[str], cwd: str, now: float) -> WorkerProcess:
        process = Mock(pid=next(pids))
        process.poll.return_value = None
        control, other = socket.socketpair()
        sockets.extend([control, other])
        return WorkerProcess(slot=slot, process=process, control=control, started_at=now)

    yield Supervisor(3, ["python", "app.py"], spawn=spawn, clock=clock)
    for sock in sockets:
        sock.close()


def test_restart_policy_backs_off_exponentially_up_to_the_cap() -> None:
    policy = RestartPolicy()
    delays = [policy.delay(0, was_ready=False, uptime=0.05) for _ in range(12)]
    assert delays[:4] == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST, 8 * BACKOFF_FIRST]
    assert delays == sorted(delays) and delays[-1] == BACKOFF_MAX
    # Spawns in the first 20 seconds of a crash loop: a handful, not a fork bomb.
    elapsed, spawns = 0.0, 0
    for delay in delays:
        elapsed += delay
        spawns += elapsed <= 20
    assert spawns <= 10


def test_healthy_worker_restarts_at_once_and_resets_the_back_off() -> None:
    policy = RestartPolicy()
    policy.delay(1, was_ready=False, uptime=0.1)
    policy.delay(1, was_ready=False, uptime=0.1)
    assert policy.delay(1, was_ready=True, uptime=60) == 0.0
    assert policy.delay(1, was_ready=True, uptime=0.2) == BACKOFF_FIRST
    assert policy.failures[1] == 1


def test_slots_are_independent() -> None:
    policy = RestartPolicy()
    for _ in range(5):
        policy.delay(0, was_ready=False, uptime=0)
    assert policy.delay(2, was_ready=False, uptime=0) == BACKOFF_FIRST


def test_reap_collects_exited_workers_and_schedules_their_slot(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = [supervisor.start(slot) for slot in range(3)]
    assert supervisor.reap() == []
    workers[1].process.poll.return_value = -signal.SIGKILL  # type: ignore[attr-defined]
    workers[1].ready = True
    clock.now += 30

    assert supervisor.reap() == [(workers[1], -signal.SIGKILL)]
    assert workers[1] not in supervisor.processes
    assert supervisor.schedule_restart(workers[1], -signal.SIGKILL)
    assert sorted(supervisor.workers) == [0, 2]
    assert supervisor.next_restart() == clock.now
    assert supervisor.due_restarts() == [1]
    supervisor.start(1)
    assert supervisor.due_restarts() == [] and supervisor.next_restart() is None


def test_boot_failure_waits_before_the_slot_restarts(supervisor: Supervisor, clock: FakeClock) -> None:
    worker = supervisor.start(0)
    clock.now += 0.2
    supervisor.schedule_restart(worker, 3)
    assert supervisor.due_restarts() == []
    clock.now += BACKOFF_FIRST
    assert supervisor.due_restarts() == [0]


def test_nothing_restarts_once_stopping(supervisor: Supervisor, clock: FakeClock) -> None:
    worker = supervisor.start(0)
    supervisor.schedule_restart(worker, 1)
    supervisor.stop()
    supervisor.schedule_restart(worker, 0)
    clock.now += 100
    assert supervisor.due_restarts() == [] and supervisor.next_restart() is None


def test_spawn_failure_backs_off(supervisor: Supervisor, clock: FakeClock) -> None:
    supervisor.spawn_failed(2, OSError(11, "Resource temporarily unavailable"))
    assert supervisor.next_restart() == clock.now + BACKOFF_FIRST


def test_kill_all_ignores_processes_that_are_already_gone(supervisor: Supervisor) -> None:
    workers = [supervisor.start(slot) for slot in range(2)]
    workers[0].process.send_signal.side_effect = ProcessLookupError  # type: ignore[attr-defined]
    supervisor.kill_all(signal.SIGTERM)
    workers[1].process.send_signal.assert_called_once_with(signal.SIGTERM)  # type: ignore[attr-defined]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_entry_command_reruns_the_interpreter_with_its_original_arguments(mocker: MockerFixture) -> None:
    mocker.patch.object(sys, "orig_argv", ["python3", "-X", "dev", "-m", "myapp.server", "--port", "80"])
    assert entry_command() == [sys.executable, "-X", "dev", "-m", "myapp.server", "--port", "80"]


def test_a_slot_that_never_starts_stops_the_server_after_max_boot_failures(
    supervisor: Supervisor, clock: FakeClock
) -> None:
    results = []
    for _ in range(MAX_BOOT_FAILURES):
        worker = supervisor.start(0)
        clock.now += 0.5
        results.append(supervisor.schedule_restart(worker, 3))
    assert results == [True] * (MAX_BOOT_FAILURES - 1) + [False]


def test_a_ready_worker_ends_the_boot_failure_streak(supervisor: Supervisor, clock: FakeClock) -> None:
    for _ in range(MAX_BOOT_FAILURES - 1):
        supervisor.schedule_restart(supervisor.start(0), 3)
    worker = supervisor.start(0)
    supervisor.note_ready(worker)
    assert supervisor.schedule_restart(worker, -9)
    assert supervisor.schedule_restart(supervisor.start(0), 3)


def test_a_replacement_is_not_current_until_promoted(supervisor: Supervisor) -> None:
    old = supervisor.start(1)
    new = supervisor.spawn(1)
    assert supervisor.workers[1] is old and {old, new} <= supervisor.processes
    assert supervisor.promote(new) is old
    assert supervisor.is_current(new) and not supervisor.is_current(old)
    # The old one finishing does not restart the slot.
    old.process.poll.return_value = 0  # type: ignore[attr-defined]
    assert supervisor.reap() == [(old, 0)]
    assert supervisor.schedule_restart(old, 0)
    assert supervisor.workers[1] is new and supervisor.next_restart() is None


def test_shrinking_cancels_restarts_of_the_removed_slots(supervisor: Supervisor) -> None:
    worker = supervisor.start(2)
    supervisor.resize(2)
    assert supervisor.schedule_restart(worker, -9)
    assert supervisor.next_restart() is None and 2 not in supervisor.workers


def test_spawn_passes_user_and_group(clock: FakeClock) -> None:
    seen: list[dict[str, object]] = []

    def spawn(slot: int, command: Sequence[str], cwd: str, now: float, **credentials: object) -> WorkerProcess:
        seen.append(credentials)
        return WorkerProcess(slot=slot, process=Mock(pid=1), control=Mock(), started_at=now)

    Supervisor(1, ["x"], spawn=spawn, clock=clock, user=65534, group=65534).start(0)
    Supervisor(1, ["x"], spawn=spawn, clock=clock).start(0)
    assert seen == [{"user": 65534, "group": 65534}, {}]


@pytest.mark.parametrize(
    ("error", "says"),
    [
        (
            BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"),
            "ran out of processes; start fewer workers",
        ),
        (PermissionError(errno.EACCES, "Permission denied", "/opt/py/bin/python"), "user 1000 must be able to run"),
        (OSError(errno.ENOMEM, "Cannot allocate memory"), "not enough memory for another process"),
    ],
)
def test_a_worker_the_os_cannot_start_is_one_line_naming_the_fix(error: OSError, says: str) -> None:
    text = describe_spawn_error(error, ["/opt/py/bin/python", "app.py"], user=1000)
    assert says in text and "\n" not in text
