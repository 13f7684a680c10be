"""Routing by session: the key a request carries, the engine.io session id that names its worker, bounded loads.

Theory of operation
-------------------
An address is a poor stand-in for a session: many clients share one behind a NAT or
a proxy, and one client's changes (Wi-Fi to cellular). With ``route_by`` set, the
master peeks at the head of each new connection's first request (nothing is read:
the worker's server sees it whole) and routes by the key it carries:

- ``engineio``: the ``sid`` query parameter of an engine.io / socket.io request. The
  session ids the workers hand out start with their slot (``3.<random>``), so a
  request of a known session goes to the slot that created it, with no shared table;
  a slot whose worker was replaced gives the sid to the replacement, which answers as
  engine.io does for a session it does not know (the client connects again).
- ``cookie:NAME``, ``header:NAME``, ``query:NAME``, ``path:N`` (the Nth segment of
  the path, from 1): the rendezvous hash of the key over the alive slots, so a key
  stays on its slot while that slot is alive and only its own keys move when not.

A request without a key (a new session, a client that sends none, bytes that are no
HTTP request) is placed by IP hash with bounded loads (Mirrokni, Thorup and
Zadimoghaddam, 2016): its address's first choice unless that worker already holds
more than ``1 + load_factor`` times the average, then the next in the address's
rendezvous order. Clients behind one address spread out; a client with its own
address lands where IP hash would put it.

Only the first request of a connection is looked at: a worker serving a kept-alive
connection answers every request on it. An engine.io worker therefore closes its
polling connections after each response (the adapters add ``Connection: close``),
so the next request comes on a new connection and is routed by its own sid, whatever
pooled the connections (a browser, a proxy with upstream keep-alive).
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from urllib.parse import unquote

from .balancer import Balancer, ClientInfo, IPHashBalancer, WorkerSet
from .rendezvous import MASK32, address_key, mix32, slot_seed

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "MAX_KEY_LENGTH",
    "ROUTE_BY_KINDS",
    "UNBOUNDED_ALLOWANCE",
    "RouteBy",
    "SessionBalancer",
    "key_hash",
    "new_session_allowance",
    "rendezvous_order",
    "session_bound",
    "session_key",
    "sid_with_slot",
    "slot_in_sid",
]

ROUTE_BY_KINDS = ("engineio", "cookie", "header", "query", "path")
# A key longer than this is no key: the request is placed as a new session is.
MAX_KEY_LENGTH = 512
# New sessions go past their first choice once it holds more than (1 + this) times the average.
DEFAULT_LOAD_FACTOR = 0.25
# The most digits a slot takes in a session id (slots are fewer than 10,000).
_SLOT_DIGITS = 4


@dataclass(frozen=True)
class RouteBy:
    """Which key routes a request (module docstring): ``kind`` and, but for ``engineio``, its ``name``."""

    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        if self.kind not in ROUTE_BY_KINDS:
            raise ValueError(f"route_by {self.kind!r}: expected ip, {', '.join(ROUTE_BY_KINDS[:-1])} or path")
        if self.kind == "engineio":
            if self.name:
                raise ValueError("route_by 'engineio' takes no name")
            return
        if not self.name or any(c in self.name for c in " \t\r\n;=:"):
            example = "path:2" if self.kind == "path" else f"{self.kind}:session"
            raise ValueError(f"route_by {self.kind!r} needs a name after a colon, e.g. {example!r}")
        if self.kind == "path" and not (self.name.isascii() and self.name.isdigit() and 0 < int(self.name) <= 64):
            raise ValueError(f"route_by 'path:{self.name}': the segment is a number from 1 to 64, e.g. 'path:2'")

    @classmethod
    def parse(cls, text: str) -> RouteBy | None:
        """``"ip"`` is None (IP hash); else ``"engineio"``, ``"cookie:NAME"``, ``"header:NAME"``, ..."""
        kind, _, name = text.strip().partition(":")
        if kind == "ip" and not name:
            return None
        return cls(kind, name.strip().lower() if kind == "header" else name.strip())

    def __str__(self) -> str:
        return self.kind if not self.name else f"{self.kind}:{self.name}"


def session_key(head: bytes, route: RouteBy) -> str | None:
    """The key ``route`` names in a complete HTTP request head, or None (no key, or not a request)."""
    line_end = head.find(b"\r\n")
    if route.kind == "engineio" and head.find(b"sid=", 0, line_end if line_end >= 0 else len(head)) < 0:
        return None  # a new session (most new connections): nothing to decode
    request_line = head[: line_end if line_end >= 0 else len(head)].decode("latin-1")
    parts = request_line.split(" ")
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return None
    target = parts[1]
    kind = route.kind
    if kind in ("engineio", "query"):
        query = target.partition("?")[2]
        wanted = "sid" if kind == "engineio" else route.name
        for pair in query.split("&"):
            name, _, value = pair.partition("=")
            if unquote(name) == wanted:
                return _bounded(unquote(value))
        return None
    if kind == "path":
        segments = [segment for segment in target.partition("?")[0].split("/") if segment]
        index = int(route.name) - 1
        return _bounded(unquote(segments[index])) if index < len(segments) else None
    wanted_header = "cookie" if kind == "cookie" else route.name
    for line in head[line_end + 2 :].decode("latin-1").split("\r\n"):
        name, colon, value = line.partition(":")
        if not colon or name.strip().lower() != wanted_header:
            continue
        if kind == "header":
            return _bounded(value.strip())
        for cookie in value.split(";"):
            cookie_name, _, cookie_value = cookie.strip().partition("=")
            if cookie_name == route.name:
                return _bounded(cookie_value.strip().strip('"'))
    return None


def _bounded(key: str) -> str | None:
    return key if 0 < len(key) <= MAX_KEY_LENGTH else None


def sid_with_slot(slot: int, sid: str) -> str:
    """An engine.io session id that names the slot whose worker created it."""
    return f"{slot}.{sid}"


def slot_in_sid(sid: str) -> int | None:
    """The slot a session id from ``sid_with_slot`` names; None for any other text."""
    digits, dot, rest = sid.partition(".")
    if not dot or not rest or not 0 < len(digits) <= _SLOT_DIGITS or not (digits.isascii() and digits.isdigit()):
        return None
    return int(digits)


def key_hash(key: str) -> int:
    """A 32-bit hash of a session key, the same in every process (unlike ``hash``)."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8", "surrogatepass"), digest_size=4).digest(), "big")


def session_bound(total: int, alive: int, load_factor: float) -> int:
    """How many sessions a worker may hold and still take a new one: at most ``1 + load_factor`` times the
    average of ``total`` over ``alive`` workers, counting the new one (and room for one when idle)."""
    return max(1, math.floor((1 + load_factor) * (total + 1) / alive))


# More than any worker could take between two ROUTES frames: the allowance when the bound can never bind.
UNBOUNDED_ALLOWANCE = 0xFFFFFFFF


def new_session_allowance(held: int, total: int, alive: int, load_factor: float) -> int:
    """How many new sessions in a row a worker holding ``held`` of ``total`` may keep under ``session_bound``.

    Each one it keeps raises the average it is bounded by, so this is more than the
    bound less ``held``: the largest k with ``held + j < session_bound(total + j, ...)``
    for every j < k, taken from ``(held + j + 1) * alive <= (1 + load_factor) * (total
    + j + 1)``, which implies it. Exact when no other worker takes a new session
    meanwhile, and never too many when they do (theirs raise the average too), so a
    worker with its own share of the addresses is not held back by how seldom it hears.
    """
    growth = 1 + load_factor
    if alive <= growth:
        return UNBOUNDED_ALLOWANCE  # one worker more can never pass the average by the factor
    room = growth * (total + 1) - alive * (held + 1)
    projected = math.floor(room / (alive - growth)) + 1 if room >= 0 else 0
    plain = session_bound(total, alive, load_factor) - held  # the room at once (at least one when idle)
    return min(UNBOUNDED_ALLOWANCE, max(0, projected, plain))


_SEEDS: list[int] = []  # slot_seed(slot) by slot, grown as slots appear (the same in every process)


def rendezvous_order(key: int, alive: tuple[int, ...]) -> list[int]:
    """``alive`` (ascending) in ``key``'s rendezvous order, best first: the first is IP hash's choice for it."""
    seeds = _SEEDS
    while len(seeds) <= alive[-1]:
        seeds.append(slot_seed(len(seeds)))
    return sorted(alive, key=lambda slot: (mix32((key ^ seeds[slot]) & MASK32), -slot), reverse=True)


class SessionBalancer(Balancer):
    """Routes a request that names a session by its key, and places a new session by IP hash with bounded loads.

    ``route``: which key (see ``RouteBy``). ``load_factor``: a new session passes
    over a worker holding more than ``1 + load_factor`` times the average of the
    sessions placed on the workers. ``ipv4_prefix`` / ``ipv6_prefix``: as for ``IPHashBalancer``.
    """

    name = "session"

    def __init__(
        self,
        route: RouteBy,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        ipv4_prefix: int = 32,
        ipv6_prefix: int = 128,
    ) -> None:
        if not (isinstance(load_factor, (int, float)) and 0 <= load_factor <= 100) or isinstance(load_factor, bool):
            raise ValueError(f"session_load_factor must be a number from 0 to 100, got {load_factor!r}")
        self.route = route
        self.load_factor = float(load_factor)
        self.ip_hash = IPHashBalancer(ipv4_prefix, ipv6_prefix)  # new sessions' first choices; the kernel's too
        # Sessions placed per slot (the load new sessions are bounded by): a connection count would not do,
        # as a polling session holds no connection between its requests. Forgotten when the slot's worker changes.
        self.sessions: dict[int, int] = {}

    def pick(self, client: ClientInfo, workers: WorkerSet) -> int:
        key = client.session
        alive = workers.alive
        if key is not None:
            if self.route.kind == "engineio":
                slot = slot_in_sid(key)
                if slot is not None and slot in alive:
                    return slot
                # A session of a slot with no worker that takes connections now: placed as a new one (its
                # worker there does not know it and says so; the client connects again).
            else:
                return rendezvous_order(key_hash(key), alive)[0]
        return self.place(client, workers)

    def place(self, client: ClientInfo, workers: WorkerSet) -> int:
        """A new session: the first slot in the address's rendezvous order that is not over its bound."""
        alive, sessions = workers.alive, self.sessions
        slot = alive[0] if len(alive) == 1 else self.ip_hash.pick(client, workers)  # first in the rendezvous order
        if client.host and len(alive) > 1:
            bound = self.bound(alive)
            if sessions.get(slot, 0) >= bound:
                key = address_key(client.host, self.ip_hash.ipv4_prefix, self.ip_hash.ipv6_prefix)
                ranked = rendezvous_order(key, alive)
                under = [slot for slot in ranked if sessions.get(slot, 0) < bound]
                slot = under[0] if under else min(ranked, key=lambda slot: sessions.get(slot, 0))
        sessions[slot] = sessions.get(slot, 0) + 1
        return slot

    def bound(self, alive: tuple[int, ...]) -> int:
        """The sessions past which a slot takes no new one: ``session_bound`` of those ``alive`` hold."""
        return session_bound(sum(self.sessions.get(slot, 0) for slot in alive), len(alive), self.load_factor)

    def allowance(self, slot: int, alive: tuple[int, ...]) -> int:
        """Kernel path: how many new sessions ``slot``'s worker may keep before it passes them to the master."""
        total = sum(self.sessions.get(alive_slot, 0) for alive_slot in alive)
        return new_session_allowance(self.sessions.get(slot, 0), total, len(alive), self.load_factor)

    def kept(self, slot: int, count: int) -> None:
        """Kernel path: ``slot``'s worker kept ``count`` new sessions it accepted itself."""
        self.sessions[slot] = self.sessions.get(slot, 0) + count

    def forget(self, slot: int) -> None:
        """``slot`` has a new worker: the sessions of the one before are gone with it."""
        self.sessions.pop(slot, None)
