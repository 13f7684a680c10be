"""The router without a master: the alive set follows the supervisor and the links, and the balancer hears of it."""

from __future__ import annotations

import socket
import types
from collections.abc import Iterator
from typing import Any

import pytest

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.link import Link
from sticky_server.process import WorkerProcess, WorkerState
from sticky_server.router import Router


class FakeSupervisor:
    """What the router asks of the supervisor: the size, each slot's current worker, and which states route."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.current: dict[int, WorkerProcess] = {}

    def takes_connections(self, worker: WorkerProcess) -> bool:
        return worker.state is WorkerState.READY


class Recording(IPHashBalancer):
    def __init__(self) -> None:
        super().__init__()
        self.told: list[tuple[int, ...]] = []

    def workers_changed(self, workers: WorkerSet) -> None:
        self.told.append(workers.alive)


World = tuple[FakeSupervisor, dict[WorkerProcess, Link]]


@pytest.fixture
def world() -> Iterator[tuple[FakeSupervisor, dict[WorkerProcess, Link]]]:
    sockets: list[socket.socket] = []
    supervisor = FakeSupervisor(3)
    links: dict[WorkerProcess, Link] = {}
    for slot in range(3):
        master_end, worker_end = socket.socketpair()
        sockets += [master_end, worker_end]
        process: Any = types.SimpleNamespace(pid=100 + slot)
        worker = WorkerProcess(slot=slot, process=process, control=master_end, started_at=0.0, worker_end=worker_end)
        worker.state = WorkerState.READY
        supervisor.current[slot] = worker
        links[worker] = Link(worker, last_heard=0.0)
    yield supervisor, links
    for sock in sockets:
        sock.close()


def test_the_alive_set_follows_the_links_and_the_supervisor(
    world: tuple[FakeSupervisor, dict[WorkerProcess, Link]],
) -> None:
    supervisor, links = world
    balancer = Recording()
    router = Router(supervisor, balancer)  # type: ignore[arg-type]
    assert router.refresh(links) == (0, 1, 2) and balancer.told == [(0, 1, 2)]
    assert router.refresh(links) == (0, 1, 2) and len(balancer.told) == 1  # no change: not told again
    link_1 = router.current[1]
    link_1.full = True  # rule 3
    assert router.refresh(links) == (0, 2) and balancer.told[-1] == (0, 2)
    supervisor.current[2].state = WorkerState.STARTING  # not one the supervisor routes to
    assert router.refresh(links) == (0,)
    client = ClientInfo("10.0.0.1", 1)
    assert router.pick(client) == 0
    link_1.full = False
    supervisor.current[2].state = WorkerState.READY
    assert router.refresh(links) == (0, 1, 2)
    link_1.live = 7
    assert list(router.workers.connections) == [0, 7, 0]  # a view of the links, never copied


def test_nothing_alive_parks(world: World) -> None:
    supervisor, links = world
    router = Router(supervisor, IPHashBalancer())  # type: ignore[arg-type]
    for worker in supervisor.current.values():
        worker.state = WorkerState.STARTING
    assert router.refresh(links) == ()
    assert router.pick(ClientInfo("10.0.0.1", 1)) is None
