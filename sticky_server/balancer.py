"""Which worker gets a connection: the ``Balancer`` contract and the built-in strategies.

The master calls ``pick(client, workers)`` once for every accepted connection and
hands the connection to the slot it returns. ``client`` is a ``ClientInfo``: the
client's address (the real one, when a trusted proxy told it), the proxy's
address if there was one, and the listening address it came in on. ``workers``
is a ``WorkerSet``: the number of slots, the slots that can take a connection
right now (their process is running, not stopping, not backed up), and the live
connection count of every slot. A new ``WorkerSet`` object is passed whenever the
alive set changes, so a strategy may cache by identity; the counts in it are
updated in place.

``pick`` must return one of ``workers.alive``, quickly: it runs in the master's
loop. A strategy that raises, returns anything else, or takes longer than
``PICK_TIME_LIMIT`` is logged (once per kind of fault) and the master routes that
connection with ``IPHashBalancer`` instead: a bad strategy never loses a
connection. ``workers_changed`` and ``connections_closed`` tell a strategy what
changed, for those that keep state.

IP hash is rendezvous (highest-random-weight) hashing: every (client, slot) pair
gets a pseudo-random score and the client goes to the alive slot with the highest
score. Removing a slot moves exactly the clients whose best slot it was (each to
its second best); bringing the slot back returns exactly those clients. No other
client ever moves. The function (``rendezvous``) is 32-bit arithmetic that a
classic BPF program computes too: on the kernel path (``steering``) the kernel
makes the same choice without the master.
"""

from __future__ import annotations

import abc
import itertools
import random
from collections.abc import Sequence
from typing import ClassVar, NamedTuple

from .rendezvous import address_key, best_slot, slot_seed

__all__ = [
    "BALANCERS",
    "Balancer",
    "ClientInfo",
    "IPHashBalancer",
    "LeastConnectionsBalancer",
    "RandomBalancer",
    "RoundRobinBalancer",
    "WorkerSet",
    "address_key",
    "balancer_from",
]

# Cached picks; cleared whenever the worker set changes or the cache is full.
IP_CACHE_SIZE = 65536
# A pick that takes longer than this (seconds) stalls the master; its answer is not used.
PICK_TIME_LIMIT = 0.05


class ClientInfo(NamedTuple):
    """What the master knows about a new connection when it routes it."""

    host: str
    """The client's IP address as text ('' when there is none, e.g. a Unix socket)."""
    port: int
    """The client's port (0 when there is none, or a forwarded header did not tell it)."""
    proxy: tuple[str, int] | None = None
    """The trusted proxy's (address, port) when ``host`` came from its PROXY or forwarded header, else None."""
    local: tuple[str, int] | None = None
    """The listening address the connection came in on (as bound: a wildcard stays a wildcard)."""
    session: str | None = None
    """With ``route_by``: the session key its first request carries (None: none, a new session)."""


class WorkerSet(NamedTuple):
    """The worker slots, as the balancer sees them."""

    size: int
    """How many slots the server has (slot ids are 0 .. size-1)."""
    alive: tuple[int, ...]
    """The slots that can take a connection now, in ascending order; never empty when passed to pick()."""
    connections: Sequence[int] = ()
    """Live connections per slot (index by slot id), updated in place by the master.

    A connection counts from the moment it is routed until its worker sees its
    descriptor closed; workers look every ``CLOSE_SWEEP_INTERVAL`` (0.5 s), so a
    close shows up to about half a second late.
    """


class Balancer(abc.ABC):
    """Base class of routing strategies. Subclass it and implement ``pick``.

    A strategy runs in the master's event loop: ``pick`` must be quick and must
    not block.
    """

    name: ClassVar[str] = ""

    @abc.abstractmethod
    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        """Return the slot (one of ``workers.alive``) that gets this connection."""

    def workers_changed(self, workers: WorkerSet) -> None:  # noqa: B027 (optional hook)
        """Called when the alive set or the number of slots changes (workers come, go, fill up)."""

    def connections_closed(self, slot: int, count: int) -> None:  # noqa: B027 (optional hook)
        """Called when ``count`` connections of ``slot`` were seen closed (``workers.connections`` already says so)."""


class IPHashBalancer(Balancer):
    """Consistent client-IP hash (rendezvous hashing); the default strategy.

    Every connection from one address goes to the same slot while that slot is
    alive. When a slot goes away only its own clients move, and they come back
    when it returns.

    ``ipv4_prefix`` / ``ipv6_prefix``: hash only the network part of an address,
    e.g. ``ipv6_prefix=64`` keeps a client that rotates its IPv6 privacy addresses
    on one worker (and every client of that /64 with it).

    Clients with no address (on a Unix socket, with no proxy header telling one)
    are spread over the workers in turn.
    """

    name = "ip-hash"

    def __init__(self, ipv4_prefix: int = 32, ipv6_prefix: int = 128) -> None:
        for name, value, bits in (("ipv4_prefix", ipv4_prefix, 32), ("ipv6_prefix", ipv6_prefix, 128)):
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= bits:
                raise ValueError(f"{name} must be a prefix length from 0 to {bits}, got {value!r}")
        self.ipv4_prefix = ipv4_prefix
        self.ipv6_prefix = ipv6_prefix
        self._cache: dict[str, int] = {}
        self._cached_for: WorkerSet | None = None
        self._seeds: list[int] = []
        self._turn = 0

    def slot_for_key(self, key: int, alive: tuple[int, ...]) -> int:
        """The alive slot with the highest score for ``key`` (an ``address_key``)."""
        seeds = self._seeds
        while len(seeds) <= alive[-1]:
            seeds.append(slot_seed(len(seeds)))
        return best_slot(key, alive, seeds)

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        if not client.host:  # a Unix-socket client has no address to stick to: take turns
            self._turn += 1
            return workers.alive[self._turn % len(workers.alive)]
        if workers is not self._cached_for or len(self._cache) >= IP_CACHE_SIZE:
            self._cache.clear()
            self._cached_for = workers
        slot = self._cache.get(client.host)
        if slot is None:
            slot = self.slot_for_key(address_key(client.host, self.ipv4_prefix, self.ipv6_prefix), workers.alive)
            self._cache[client.host] = slot
        return slot


class RoundRobinBalancer(Balancer):
    """Each connection to the next alive slot in turn. Not sticky: for stateless servers."""

    name = "round-robin"

    def __init__(self) -> None:
        self._counter = itertools.count()

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        alive = workers.alive
        return alive[next(self._counter) % len(alive)]


class RandomBalancer(Balancer):
    """Each connection to an alive slot chosen at random. Not sticky: for stateless servers."""

    name = "random"

    def __init__(self, seed: int | None = None) -> None:
        self._random = random.Random(seed)

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        return self._random.choice(workers.alive)


class LeastConnectionsBalancer(Balancer):
    """Each connection to the alive slot with the fewest live connections; ties go round in turn.

    Not sticky: for servers whose connections differ in length (see
    ``WorkerSet.connections`` for how current the counts are).
    """

    name = "least-connections"

    def __init__(self) -> None:
        self._turn = itertools.count()

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        alive, counts = workers.alive, workers.connections
        start = next(self._turn) % len(alive)
        best = alive[start]
        fewest = counts[best]
        for index in range(start + 1, start + len(alive)):
            slot = alive[index % len(alive)]
            if counts[slot] < fewest:
                best, fewest = slot, counts[slot]
        return best


BALANCERS: dict[str, type[Balancer]] = {
    IPHashBalancer.name: IPHashBalancer,
    RoundRobinBalancer.name: RoundRobinBalancer,
    RandomBalancer.name: RandomBalancer,
    LeastConnectionsBalancer.name: LeastConnectionsBalancer,
}


def balancer_from(spec: Balancer | str) -> Balancer:
    """A balancer instance from an instance or a built-in name (see ``BALANCERS``)."""
    if isinstance(spec, Balancer):
        return spec
    if isinstance(spec, str):
        try:
            return BALANCERS[spec]()
        except KeyError:
            names = ", ".join(sorted(BALANCERS))
            raise ValueError(f"unknown balancer {spec!r}; use one of: {names}, or a Balancer instance") from None
    raise TypeError(
        f"balancer must be a Balancer instance or a name ({', '.join(sorted(BALANCERS))}), not {type(spec).__name__}"
    )
