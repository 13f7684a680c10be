"""Master rule 7 (``steering.keeper``) without processes or a kernel: fake groups, fake links, a fake clock."""

from __future__ import annotations

import logging
import socket
import types
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sticky_server.master.link import BACKED_UP_QUEUE, Link
from sticky_server.master.process import WorkerProcess
from sticky_server.steering.keeper import QUEUE_CHECK_INTERVAL, SteeringKeeper


class FakeGroup:
    def __init__(self, slots: int) -> None:
        self.listeners: list[Any] = [f"listener-{slot}" for slot in range(slots)]


class FakeSteering:
    """A KernelSteering whose kernel may refuse programs and whose listeners may break."""

    def __init__(self, slots: int) -> None:
        self.groups = [FakeGroup(slots)]
        self.steered: tuple[int, ...] = tuple(range(slots))
        self.refuse = False
        self.queues: dict[int, int] = {}
        self.broken_slots: list[int] = []
        self.replaced: list[int] = []
        self.stranger: str | None = None

    def steer(self, slots: tuple[int, ...]) -> None:
        if self.refuse:
            raise OSError("refused")
        self.steered = slots

    def queue_length(self, slot: int) -> int:
        return self.queues.get(slot, 0)

    def broken(self) -> list[int]:
        return list(self.broken_slots)

    def replace(self, slot: int) -> None:
        self.replaced.append(slot)
        self.groups[0].listeners[slot] = f"listener-{slot}-new"
        self.broken_slots.remove(slot)

    def strangers(self) -> str | None:
        return self.stranger


@pytest.fixture
def links() -> Iterator[Callable[[int], Link]]:
    """``make(slot)``: a real link (no process behind it: rule 7 only names its pid)."""
    made: list[socket.socket] = []

    def make(slot: int) -> Link:
        master_end, worker_end = socket.socketpair()
        made.extend((master_end, worker_end))
        process: Any = types.SimpleNamespace(pid=1000 + slot)  # never run: rule 7 reads only its pid
        worker = WorkerProcess(slot=slot, process=process, control=master_end, started_at=0.0, worker_end=worker_end)
        return Link(worker, last_heard=0.0)

    yield make
    for sock in made:
        sock.close()


LOCAL = [("127.0.0.1", 8000)]


def as_any(value: Any) -> Any:
    """The keeper's listeners here are the fakes' strings."""
    return value


def keeper_of(steering: FakeSteering, now: list[float]) -> SteeringKeeper:
    return SteeringKeeper(steering, LOCAL, clock=lambda: now[0])  # type: ignore[arg-type]


def test_the_program_follows_the_alive_slots_and_the_rest_are_drained() -> None:
    steering, now = FakeSteering(3), [5.0]
    keeper = keeper_of(steering, now)
    keeper.follow((0, 2))
    assert steering.steered == (0, 2)
    assert as_any(keeper.drained) == {"listener-1": LOCAL[0]}
    assert keeper.next_check == 5.0 + QUEUE_CHECK_INTERVAL


def test_a_refused_program_leaves_the_old_one_and_the_alive_set_decides_what_is_drained(
    caplog: pytest.LogCaptureFixture,
) -> None:
    steering, now = FakeSteering(3), [0.0]
    keeper = keeper_of(steering, now)
    steering.refuse = True
    with caplog.at_level(logging.ERROR, "sticky_server"):
        keeper.follow((0, 2))
    assert steering.steered == (0, 1, 2)  # stale: the kernel still sends slot 1's clients there
    assert as_any(keeper.drained) == {"listener-1": LOCAL[0]}  # and the master takes them
    assert "the kernel refused the steering program" in caplog.text


def test_a_slot_backed_up_at_two_looks_is_left_out_until_heard_from(
    caplog: pytest.LogCaptureFixture, links: Callable[[int], Link]
) -> None:
    steering, now = FakeSteering(2), [0.0]
    keeper = keeper_of(steering, now)
    current = {0: links(0), 1: links(1)}
    steering.queues[1] = BACKED_UP_QUEUE
    assert not keeper.check(0.1, current).changed
    with caplog.at_level(logging.WARNING, "sticky_server"):
        assert keeper.check(0.2, current).changed
    assert current[1].backed_up and not current[0].backed_up and not current[1].takes_connections
    assert f"worker 1 (pid {current[1].pid}) leaves {BACKED_UP_QUEUE} connections waiting" in caplog.text
    assert keeper.next_check == pytest.approx(0.2 + QUEUE_CHECK_INTERVAL)
    assert not keeper.check(0.3, current).changed  # still not heard from
    current[1].last_heard = 0.35
    assert keeper.check(0.4, current).changed and current[1].takes_connections


def test_a_broken_listener_is_replaced_and_its_slot_returned_for_a_new_worker(
    caplog: pytest.LogCaptureFixture, links: Callable[[int], Link]
) -> None:
    steering, now = FakeSteering(3), [0.0]
    keeper = keeper_of(steering, now)
    steering.broken_slots = [1]
    link = links(1)
    with caplog.at_level(logging.ERROR, "sticky_server"):
        checked = keeper.check(0.1, {1: link})
    assert checked.changed and checked.replace == [1] and steering.replaced == [1]
    assert "worker 1's listener stopped listening" in caplog.text and f"worker pid {link.pid}" in caplog.text
    assert ("listener-1-new", LOCAL[0]) in as_any(keeper.every_listener())
    assert keeper.check(0.2, {}).replace == []


def test_growth_is_refused_while_a_stranger_is_in_a_group() -> None:
    steering, now = FakeSteering(2), [0.0]
    keeper = keeper_of(steering, now)
    assert keeper.refuse_growth() is None
    steering.stranger = "process 42 listens on 127.0.0.1:8000 in this server's SO_REUSEPORT group"
    assert keeper.refuse_growth() == (
        "process 42 listens on 127.0.0.1:8000 in this server's SO_REUSEPORT group; a new worker's clients "
        "would go to it. Stop that process, then send SIGTTIN again"
    )
