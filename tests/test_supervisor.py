"""The supervisor's decisions with a fake clock and fake processes (real processes: integration/)."""

from __future__ import annotations

import errno
import signal
import sys
from collections.abc import Iterator
from unittest.mock import Mock

import pytest
from pytest_mock import MockerFixture

from sticky_server.errors import WorkerBootError
from sticky_server.master.decisions import Connect, Decision, Halt, Listening, Ping, SendStop, StopMode
from sticky_server.master.process import WorkerProcess, WorkerState, describe_exit, describe_spawn_error, entry_command
from sticky_server.master.restarts import BACKOFF_FIRST, BACKOFF_MAX, MAX_BOOT_FAILURES, RestartPolicy
from sticky_server.master.supervisor import ABORT_GRACE, QUICK_STOP_SECONDS, Supervisor
from tests.fakes import FakeSpawn


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
    spawn = FakeSpawn()
    yield Supervisor(3, ["python", "app.py"], spawn=spawn, clock=clock)
    spawn.close()


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


def exit_(worker: WorkerProcess, returncode: int) -> None:
    """The fake process ends with ``returncode``."""
    worker.process.poll.return_value = returncode  # type: ignore[attr-defined]


def started(decisions: list[Decision]) -> list[WorkerProcess]:
    return [decision.worker for decision in decisions if isinstance(decision, Connect)]


def booted(supervisor: Supervisor) -> list[WorkerProcess]:
    workers = started(supervisor.boot())
    assert [worker.slot for worker in workers] == list(range(supervisor.size))
    return workers


def all_ready(supervisor: Supervisor, workers: list[WorkerProcess]) -> list[Decision]:
    decisions: list[Decision] = []
    for worker in workers:
        decisions += supervisor.ready(worker)
    return decisions


def serving(supervisor: Supervisor) -> list[WorkerProcess]:
    """Boot, and every first worker says READY."""
    workers = booted(supervisor)
    assert all_ready(supervisor, workers) == [Listening()]
    return workers


def reap_one(supervisor: Supervisor, worker: WorkerProcess, returncode: int) -> list[Decision]:
    exit_(worker, returncode)
    assert supervisor.reap() == [(worker, returncode)]
    return supervisor.exited(worker, returncode)


def never_heard(worker: WorkerProcess) -> float | None:
    return None


def test_boot_starts_every_slot_and_says_listening_once_all_are_ready(supervisor: Supervisor) -> None:
    workers = booted(supervisor)
    assert all(worker.state is WorkerState.STARTING for worker in workers)
    assert all(supervisor.takes_connections(worker) for worker in workers)  # clients queue for a starting worker
    assert supervisor.ready(workers[0]) == [] and supervisor.ready(workers[1]) == []
    assert supervisor.ready(workers[2]) == [Listening()]
    assert supervisor.ready(workers[2]) == []  # once
    assert all(worker.state is WorkerState.READY for worker in workers)


def test_a_worker_the_os_cannot_start_at_boot_is_one_error(clock: FakeClock) -> None:
    spawn = FakeSpawn(fail=BlockingIOError(errno.EAGAIN, "Resource temporarily unavailable"))
    with pytest.raises(WorkerBootError, match=r"could not start worker 0: .*the server did not start"):
        Supervisor(2, ["x"], spawn=spawn, clock=clock).boot()


def test_a_healthy_worker_that_dies_restarts_at_once(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = serving(supervisor)
    clock.now += 30
    assert reap_one(supervisor, workers[1], -signal.SIGKILL) == []
    assert sorted(supervisor.current) == [0, 2] and supervisor.restarts == {1: 1}
    assert supervisor.next_deadline == clock.now
    (new,) = started(supervisor.due(clock.now, never_heard) or [])
    assert new.slot == 1 and supervisor.current[1] is new and supervisor.next_deadline is None
    assert supervisor.due(clock.now, never_heard) is None  # nothing due: the loop's every-turn question is cheap


def test_a_worker_that_dies_young_restarts_after_a_growing_back_off(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = serving(supervisor)
    worker = workers[0]
    delays = []
    for _ in range(3):
        clock.now += 0.2  # ready, but not up for HEALTHY_UPTIME
        reap_one(supervisor, worker, 1)
        assert supervisor.next_deadline is not None
        delays.append(round(supervisor.next_deadline - clock.now, 6))
        assert supervisor.due(clock.now, never_heard) is None  # not yet
        clock.now = supervisor.next_deadline
        (worker,) = started(supervisor.due(clock.now, never_heard) or [])
        supervisor.ready(worker)
    assert delays == [BACKOFF_FIRST, 2 * BACKOFF_FIRST, 4 * BACKOFF_FIRST]


def test_a_worker_that_fails_before_the_server_started_halts_it(supervisor: Supervisor) -> None:
    workers = booted(supervisor)
    supervisor.ready(workers[0])
    (halt,) = reap_one(supervisor, workers[1], 3)
    assert isinstance(halt, Halt)
    assert "worker 1 (pid" in str(halt.error) and "before it was ready, so the server did not start" in str(halt.error)


def test_a_slot_that_never_starts_again_halts_the_server_after_max_boot_failures(
    supervisor: Supervisor, clock: FakeClock
) -> None:
    workers = serving(supervisor)
    clock.now += 60
    reap_one(supervisor, workers[0], -signal.SIGKILL)  # a healthy worker killed: restarts at once
    decisions: list[Decision] = []
    for _ in range(MAX_BOOT_FAILURES):
        assert supervisor.next_deadline is not None
        clock.now = supervisor.next_deadline
        (worker,) = started(supervisor.due(clock.now, never_heard) or [])
        clock.now += 0.5
        decisions = reap_one(supervisor, worker, 3)  # dies before it is ready
    (halt,) = decisions
    assert isinstance(halt, Halt) and f"failed to start {MAX_BOOT_FAILURES} times in a row" in str(halt.error)


def test_a_ready_worker_ends_the_boot_failure_streak(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = serving(supervisor)
    worker = workers[0]
    for failures in range(2 * MAX_BOOT_FAILURES):
        clock.now += 60
        decisions = reap_one(supervisor, worker, 3)
        assert not any(isinstance(decision, Halt) for decision in decisions)
        assert supervisor.next_deadline is not None
        clock.now = supervisor.next_deadline
        (worker,) = started(supervisor.due(clock.now, never_heard) or [])
        if failures % (MAX_BOOT_FAILURES - 1) == MAX_BOOT_FAILURES - 2:
            supervisor.ready(worker)


def test_a_reload_replaces_one_slot_at_a_time_and_stops_each_old_worker_once_its_replacement_is_ready(
    supervisor: Supervisor,
) -> None:
    old = serving(supervisor)
    new: list[WorkerProcess] = []
    decisions = supervisor.reload()
    for slot in range(3):
        (replacement,) = started(decisions)
        assert replacement.slot == slot and supervisor.replacements == {slot: replacement}
        assert supervisor.current[slot] is old[slot] and not supervisor.takes_connections(replacement)
        decisions = supervisor.ready(replacement)
        assert decisions[0] == SendStop(old[slot]) and old[slot].state is WorkerState.STOPPING
        assert supervisor.current[slot] is replacement and supervisor.takes_connections(replacement)
        new.append(replacement)
    assert decisions[1:] == [] and supervisor.replacements == {}
    for worker in old:  # the finished ones exit: no restart, no decision
        assert reap_one(supervisor, worker, 0) == []
    assert supervisor.current == dict(enumerate(new)) and supervisor.next_deadline is None


def test_a_second_reload_during_one_queues_nothing_twice(supervisor: Supervisor) -> None:
    serving(supervisor)
    first = started(supervisor.reload())
    assert started(supervisor.reload()) == [] and started(supervisor.replace(0, "recycle")) == []
    decisions = supervisor.ready(first[0])
    assert [worker.slot for worker in started(decisions)] == [1]


def test_a_replacement_that_fails_keeps_the_running_worker_and_abandons_the_reload(supervisor: Supervisor) -> None:
    workers = serving(supervisor)
    (replacement,) = started(supervisor.reload())
    assert reap_one(supervisor, replacement, 3) == []
    assert supervisor.current == dict(enumerate(workers)) and supervisor.replacements == {}
    assert supervisor.next_deadline is None  # no restart: the slot kept its worker


def test_the_heartbeat_pings_ready_workers_and_kills_a_silent_one(clock: FakeClock, supervisor: Supervisor) -> None:
    supervisor.timeout = 3.0
    workers = serving(supervisor)
    heard = {worker: clock.now for worker in workers}
    assert supervisor.next_deadline == clock.now + 1.0  # timeout / HEARTBEATS_PER_TIMEOUT
    clock.now += 1.0
    assert supervisor.due(clock.now, heard.get) == [Ping(worker) for worker in workers]
    heard[workers[0]] = heard[workers[2]] = clock.now
    clock.now += 3.0
    decisions = supervisor.due(clock.now, heard.get)
    assert decisions == [Ping(workers[0]), Ping(workers[2])]
    assert workers[1].state is WorkerState.HUNG and not supervisor.takes_connections(workers[1])
    workers[1].process.send_signal.assert_called_once_with(signal.SIGABRT)  # type: ignore[attr-defined]
    clock.now += ABORT_GRACE
    supervisor.due(clock.now, heard.get)
    workers[1].process.kill.assert_called_once_with()  # type: ignore[attr-defined]


def test_grow_adds_a_slot_and_shrink_stops_the_last(supervisor: Supervisor) -> None:
    workers = serving(supervisor)
    (added,) = started(supervisor.grow())
    assert added.slot == 3 and supervisor.size == 4
    assert supervisor.shrink() == [SendStop(added)]
    assert supervisor.size == 3 and 3 not in supervisor.current
    assert reap_one(supervisor, added, 0) == [] and supervisor.next_deadline is None  # its kill deadline went too
    assert supervisor.shrink() == [SendStop(workers[2])] and supervisor.shrink() == [SendStop(workers[1])]
    assert supervisor.shrink() == [] and supervisor.size == 1  # never below one


def test_a_removed_slot_is_not_restarted(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = serving(supervisor)
    clock.now += 60
    reap_one(supervisor, workers[2], -signal.SIGKILL)
    supervisor.shrink()
    assert supervisor.next_deadline is None and supervisor.due(clock.now, never_heard) is None


def test_graceful_stop_stops_every_worker_once_asked_then_kills_late_ones(
    supervisor: Supervisor, clock: FakeClock
) -> None:
    supervisor.graceful_timeout = 5.0
    workers = serving(supervisor)
    supervisor.stop("SIGTERM", StopMode.GRACEFUL)
    assert all(worker.state is WorkerState.READY for worker in workers)  # STOP waits for the loop's word
    assert supervisor.stop_workers() == [SendStop(worker) for worker in workers]
    assert supervisor.stop_workers() == []
    assert reap_one(supervisor, workers[0], 0) == []  # no restart while stopping
    clock.now += 5.0
    supervisor.due(clock.now, never_heard)
    workers[0].process.kill.assert_not_called()  # type: ignore[attr-defined]
    for worker in workers[1:]:
        worker.process.kill.assert_called_once_with()  # type: ignore[attr-defined]


def test_quick_stop_sends_sigquit_and_kills_two_seconds_later(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = booted(supervisor)
    supervisor.stop("SIGINT", StopMode.QUICK)
    for worker in workers:
        assert worker.state is WorkerState.STOPPING
        worker.process.send_signal.assert_called_once_with(signal.SIGQUIT)  # type: ignore[attr-defined]
    assert supervisor.next_deadline == clock.now + QUICK_STOP_SECONDS
    assert supervisor.stop_workers() == []  # nobody is sent STOP as well
    clock.now += QUICK_STOP_SECONDS
    supervisor.due(clock.now, never_heard)
    for worker in workers:
        worker.process.kill.assert_called_once_with()  # type: ignore[attr-defined]


def test_a_second_stop_kills_at_once(supervisor: Supervisor) -> None:
    workers = booted(supervisor)
    supervisor.stop("SIGTERM", StopMode.GRACEFUL)
    supervisor.stop("SIGTERM", StopMode.GRACEFUL)
    for worker in workers:
        worker.process.send_signal.assert_called_once_with(signal.SIGKILL)  # type: ignore[attr-defined]


def test_nothing_restarts_or_is_replaced_once_stopping(supervisor: Supervisor, clock: FakeClock) -> None:
    workers = serving(supervisor)
    clock.now += 60
    reap_one(supervisor, workers[0], 1)
    supervisor.stop("SIGTERM", StopMode.GRACEFUL)
    assert supervisor.next_deadline is None
    assert supervisor.reload() == [] and supervisor.grow() == [] and supervisor.shrink() == []


def test_a_worker_that_lost_its_control_socket_is_killed_if_it_does_not_exit(
    supervisor: Supervisor, clock: FakeClock
) -> None:
    supervisor.graceful_timeout = 5.0
    workers = serving(supervisor)
    assert supervisor.next_deadline is None
    supervisor.lost_control(workers[0])
    assert not supervisor.takes_connections(workers[0])
    clock.now += 5.0
    supervisor.due(clock.now, never_heard)
    workers[0].process.kill.assert_called_once_with()  # type: ignore[attr-defined]


def test_spawn_failure_backs_off(supervisor: Supervisor, clock: FakeClock) -> None:
    supervisor.spawn_failed(2, OSError(11, "Resource temporarily unavailable"))
    assert supervisor.next_deadline == clock.now + BACKOFF_FIRST


def test_kill_all_ignores_processes_that_are_already_gone(supervisor: Supervisor) -> None:
    workers = booted(supervisor)
    workers[0].process.send_signal.side_effect = ProcessLookupError  # type: ignore[attr-defined]
    supervisor.kill_all(signal.SIGTERM)
    workers[1].process.send_signal.assert_called_once_with(signal.SIGTERM)  # type: ignore[attr-defined]


def test_describe_exit() -> None:
    assert describe_exit(0) == "exited with code 0"
    assert describe_exit(-signal.SIGKILL) == "was killed by SIGKILL"


def test_entry_command_reruns_the_interpreter_with_its_original_arguments(mocker: MockerFixture) -> None:
    mocker.patch.object(sys, "orig_argv", ["python3", "-X", "dev", "-m", "myapp.server", "--port", "80"])
    assert entry_command() == [sys.executable, "-X", "dev", "-m", "myapp.server", "--port", "80"]


def test_spawn_passes_user_and_group(clock: FakeClock) -> None:
    spawn = FakeSpawn()
    Supervisor(1, ["x"], spawn=spawn, clock=clock, user=65534, group=65534).boot()
    Supervisor(1, ["x"], spawn=spawn, clock=clock).boot()
    assert spawn.extras == [{"user": 65534, "group": 65534}, {}]
    spawn.close()


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


def test_on_the_kernel_path_a_starting_worker_takes_no_connections(clock: FakeClock) -> None:
    listeners_for = Mock(return_value=["listener"])
    spawn = FakeSpawn()
    supervisor = Supervisor(2, ["app"], spawn=spawn, clock=clock, listeners_for=listeners_for, routes_to_starting=False)
    workers = booted(supervisor)
    assert [call.args for call in listeners_for.call_args_list] == [(0,), (1,)]
    assert spawn.extras == [{"listeners": ["listener"]}] * 2  # the slot's own listener, inherited
    assert not any(supervisor.takes_connections(worker) for worker in workers)  # its clients: their next choice
    supervisor.ready(workers[0])
    assert supervisor.takes_connections(workers[0]) and not supervisor.takes_connections(workers[1])
    spawn.close()
