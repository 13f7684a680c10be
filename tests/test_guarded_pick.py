"""The user's balancer, guarded: faults are logged once per kind and their connections routed by IP hash."""

from __future__ import annotations

import logging
import time

import pytest

from sticky_server.balancer import Balancer, ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.master.guarded_pick import GuardedBalancer

ALIVE = WorkerSet(3, (0, 2), (0, 0, 0))
CLIENT = ClientInfo("10.0.0.7", 4000)


class Picks(Balancer):
    def __init__(self, answer: object = 2, error: Exception | None = None, delay: float = 0.0) -> None:
        self.answer, self.error, self.delay = answer, error, delay

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        time.sleep(self.delay)
        if self.error is not None:
            raise self.error
        return self.answer  # type: ignore[return-value]

    def connections_closed(self, slot: int, count: int) -> None:
        raise RuntimeError("closing went wrong")


def test_a_good_pick_is_taken() -> None:
    assert GuardedBalancer(Picks(2)).pick(CLIENT, ALIVE, frozenset(ALIVE.alive)) == 2


def test_no_alive_slot_is_none() -> None:
    assert GuardedBalancer(Picks(2)).pick(CLIENT, WorkerSet(3, (), (0, 0, 0)), frozenset()) is None


@pytest.mark.parametrize(
    ("balancer", "said"),
    [
        (Picks(error=ValueError("boom")), "raised ValueError: boom"),
        (Picks(answer=1), "returned 1, which is not one of the alive slots (0, 2)"),
        (Picks(answer=True), "returned True"),
        (Picks(answer="0"), "returned '0'"),
        (Picks(delay=0.15), "ms to pick"),
    ],
)
def test_a_faulty_pick_is_logged_once_and_routed_by_ip_hash(
    balancer: Picks, said: str, caplog: pytest.LogCaptureFixture
) -> None:
    guarded = GuardedBalancer(balancer)
    expected = IPHashBalancer().pick(CLIENT, ALIVE)
    with caplog.at_level(logging.ERROR, "sticky_server"):
        assert guarded.pick(CLIENT, ALIVE, frozenset(ALIVE.alive)) == expected
        assert guarded.pick(CLIENT, ALIVE, frozenset(ALIVE.alive)) == expected
    (record,) = caplog.records
    assert said in record.getMessage() and "routing such connections by IP hash instead" in record.getMessage()


def test_a_notification_that_raises_is_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    guarded = GuardedBalancer(Picks())
    with caplog.at_level(logging.ERROR, "sticky_server"):
        guarded.connections_closed(0, 3)
        guarded.connections_closed(0, 1)
        guarded.workers_changed(ALIVE)  # the base class's does nothing
    (record,) = caplog.records
    assert "connections_closed() raised RuntimeError: closing went wrong" in record.getMessage()
