"""The router without a master: the alive set follows the supervisor and the links, and the balancer hears of it."""

from __future__ import annotations

import socket
import types
from collections.abc import Iterator
from typing import Any

import pytest

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.master.link import Link
from sticky_server.master.process import WorkerProcess, WorkerState
from sticky_server.master.router import Router


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


def make_router(world: World, balancer: IPHashBalancer) -> Router:
    supervisor, links = world
    router = Router(supervisor, balancer)  # type: ignore[arg-type]
    router.links.update(links)
    return router


def test_the_alive_set_follows_the_links_and_the_supervisor(world: World) -> None:
    supervisor, _ = world
    balancer = Recording()
    router = make_router(world, balancer)
    assert router.workers.alive == (0, 1, 2) and balancer.told == [(0, 1, 2)]
    router.mark_dirty()
    assert router.workers.alive == (0, 1, 2) and len(balancer.told) == 1  # no change: not told again
    generation = router.generation
    link_1 = router.current[1]
    link_1.full = True  # as Link.route sets it (rule 3); whoever applied the event tells the router
    router.changed(link_1)
    assert router.alive == {0, 2} and balancer.told[-1] == (0, 2) and router.generation == generation + 1
    supervisor.current[2].state = WorkerState.STARTING  # not one the supervisor routes to
    router.mark_dirty()  # (the loop does after every supervisor decision)
    client = ClientInfo("10.0.0.1", 1)
    assert router.pick(client) == 0  # recomputed before the pick
    link_1.full = False
    supervisor.current[2].state = WorkerState.READY
    router.mark_dirty()
    assert router.workers.alive == (0, 1, 2)
    link_1.live = 7
    assert list(router.workers.connections) == [0, 7, 0]  # a view of the links, never copied


def test_routing_owes_the_connection_to_its_link_and_says_when_the_link_leaves_routing(world: World) -> None:
    router = make_router(world, IPHashBalancer())
    client = ClientInfo("10.0.0.1", 1)
    slot = router.pick(client)
    assert slot is not None
    link = router.current[slot]
    link.ready(64)  # a ceiling of 32
    for n in range(31):
        assert router.route((n, -1, client)) is link
    assert slot in router.alive
    assert router.route((31, -1, client)) is link  # its 32nd: at the ceiling (rule 6)
    assert slot not in router.alive and router.pick(client) != slot  # the next goes to its next choice
    router.closed(link, 4)  # a tenth of 32 (3) closed: back
    assert slot in router.alive
    link.pending.clear()  # (fake descriptors)


def test_nothing_alive_parks(world: World) -> None:
    supervisor, _ = world
    router = make_router(world, IPHashBalancer())
    for worker in supervisor.current.values():
        worker.state = WorkerState.STARTING
    router.mark_dirty()
    assert router.route((1, -1, ClientInfo("10.0.0.1", 1))) is None
    assert [entry[0] for entry in router.parked] == [1]
