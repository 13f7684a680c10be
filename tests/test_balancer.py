"""The built-in strategies: balance, minimal movement, address normalisation, and the cache."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from sticky_server import (
    Balancer,
    ClientInfo,
    IPHashBalancer,
    LeastConnectionsBalancer,
    RandomBalancer,
    RoundRobinBalancer,
    WorkerSet,
)
from sticky_server.balancer import IP_CACHE_SIZE, address_key, balancer_from
from sticky_server.rendezvous import mix32, slot_seed

WORKERS = 8
ALL = tuple(range(WORKERS))


def random_addresses(version: int, count: int = 100_000) -> list[str]:
    rng = random.Random(version)
    if version == 4:
        return [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(count)]
    return [str(ipaddress.IPv6Address(rng.getrandbits(128))) for _ in range(count)]


@pytest.fixture(scope="module", params=[4, 6], ids=["IPv4", "IPv6"])
def placement(request: pytest.FixtureRequest) -> tuple[list[int], list[int]]:
    keys = [address_key(address) for address in random_addresses(request.param)]
    hasher = IPHashBalancer()
    return keys, [hasher.slot_for_key(key, ALL) for key in keys]


@pytest.mark.parametrize("removed", [0, 5])
def test_removing_a_worker_moves_only_its_own_addresses_and_they_come_back(
    placement: tuple[list[int], list[int]], removed: int
) -> None:
    keys, slots = placement
    hasher = IPHashBalancer()
    remaining = tuple(slot for slot in ALL if slot != removed)
    moved = 0
    for key, before in zip(keys, slots, strict=True):
        after = hasher.slot_for_key(key, remaining)
        if before == removed:
            moved += 1
            assert after != removed
        else:
            assert after == before
    assert moved == slots.count(removed) > 0
    # Bringing it back restores every address to where it was.
    assert [hasher.slot_for_key(key, ALL) for key in keys[:20_000]] == slots[:20_000]


def test_ipv4_mapped_ipv6_hashes_like_ipv4() -> None:
    for address in random_addresses(4, 1000):
        assert address_key(f"::ffff:{address}") == address_key(address)
    assert address_key("::ffff:10.0.0.1") != address_key("10.0.0.2")
    assert address_key("fe80::1%eth0") == address_key("fe80::1")


def test_non_ip_addresses_still_hash() -> None:
    assert address_key("") == address_key("")
    assert address_key("/tmp/sock") != address_key("")


def test_pick_is_sticky_and_follows_worker_set_changes() -> None:
    balancer = IPHashBalancer()
    full = WorkerSet(4, (0, 1, 2, 3))
    clients = [ClientInfo(address, 1000) for address in random_addresses(4, 500)]
    first = {client.host: balancer.pick(client, full) for client in clients}
    assert {client.host: balancer.pick(client._replace(port=2000), full) for client in clients} == first
    victim = first[clients[0].host]
    without = WorkerSet(4, tuple(slot for slot in full.alive if slot != victim))
    for client in clients:
        slot = balancer.pick(client, without)
        assert slot != victim
        if first[client.host] != victim:
            assert slot == first[client.host]
    assert {client.host: balancer.pick(client, WorkerSet(4, (0, 1, 2, 3))) for client in clients} == first


def test_cache_is_bounded() -> None:
    balancer = IPHashBalancer()
    workers = WorkerSet(2, (0, 1))
    for address in random_addresses(6, IP_CACHE_SIZE + 10):
        balancer.pick(ClientInfo(address, 0), workers)
    assert len(balancer._cache) <= IP_CACHE_SIZE


def test_round_robin_cycles_over_alive_slots() -> None:
    balancer = RoundRobinBalancer()
    picks = [balancer.pick(ClientInfo("127.0.0.1", 1), WorkerSet(4, (0, 2, 3))) for _ in range(6)]
    assert picks == [0, 2, 3, 0, 2, 3]


def test_balancer_from_names_and_instances() -> None:
    assert isinstance(balancer_from("ip-hash"), IPHashBalancer)
    assert isinstance(balancer_from("round-robin"), RoundRobinBalancer)
    mine = RoundRobinBalancer()
    assert balancer_from(mine) is mine
    assert isinstance(balancer_from("random"), RandomBalancer)
    assert isinstance(balancer_from("least-connections"), LeastConnectionsBalancer)
    with pytest.raises(
        ValueError, match="unknown balancer 'fastest'; use one of: ip-hash, least-connections, random, round-robin"
    ):
        balancer_from("fastest")
    with pytest.raises(TypeError, match="not int"):
        balancer_from(3)  # type: ignore[arg-type]


def test_custom_balancer_needs_pick() -> None:
    class Incomplete(Balancer):
        pass

    with pytest.raises(TypeError, match="pick"):
        Incomplete()  # type: ignore[abstract]


# Worker counts from 2 to 64; the balance bound is checked on every one.
WORKER_COUNTS = (2, 3, 5, 8, 13, 16, 32, 64)


def winners_for_every_count(hasher: IPHashBalancer, keys: list[int]) -> dict[int, list[int]]:
    """For each count in WORKER_COUNTS, the slot of every key when slots 0..count-1 are alive.

    One pass of 64 scores per key (the running maximum gives every count at once)
    instead of one slot_for_key call per count; checked against slot_for_key below.
    """
    seeds = [slot_seed(slot) for slot in range(max(WORKER_COUNTS))]
    checkpoints = set(WORKER_COUNTS)
    winners: dict[int, list[int]] = {count: [] for count in WORKER_COUNTS}
    for key in keys:
        best_slot, best_score = 0, -1
        for slot, seed in enumerate(seeds):
            score = mix32(key ^ seed)
            if score > best_score:
                best_slot, best_score = slot, score
            if slot + 1 in checkpoints:
                winners[slot + 1].append(best_slot)
    return winners


@pytest.mark.parametrize("version", [4, 6], ids=["IPv4", "IPv6"])
def test_ip_hash_balances_within_10_percent_from_2_to_64_workers(version: int) -> None:
    if version == 4:  # sequential addresses: the structure a real client population has
        addresses = [str(ipaddress.IPv4Address(0x0A000000 + n)) for n in range(100_000)]
    else:
        addresses = random_addresses(6)
    hasher = IPHashBalancer()
    keys = [address_key(address) for address in addresses]
    winners = winners_for_every_count(hasher, keys)
    for workers, slots in winners.items():
        alive = tuple(range(workers))
        assert [hasher.slot_for_key(key, alive) for key in keys[:1000]] == slots[:1000]  # the real path agrees
        counts = collections.Counter(slots)
        mean = len(keys) / workers
        worst = max(abs(count - mean) / mean for count in counts.values())
        assert len(counts) == workers and worst <= 0.10, f"{workers} workers: off by {worst:.1%}"


def test_a_joining_worker_takes_only_its_share_from_the_others() -> None:
    keys = [address_key(address) for address in random_addresses(4, 50_000)]
    hasher = IPHashBalancer()
    before = [hasher.slot_for_key(key, tuple(range(16))) for key in keys]
    after = [hasher.slot_for_key(key, tuple(range(17))) for key in keys]
    moved = [(old, new) for old, new in zip(before, after, strict=True) if old != new]
    assert all(new == 16 for _, new in moved)  # every key that moves, moves to the new worker
    assert abs(len(moved) - len(keys) / 17) <= 0.10 * len(keys) / 17


def test_prefix_hashing_keeps_a_network_together() -> None:
    by_64 = IPHashBalancer(ipv6_prefix=64)
    by_24 = IPHashBalancer(ipv4_prefix=24)
    workers = WorkerSet(16, tuple(range(16)))
    rotating = [f"2001:db8:1:2:{n:x}::{n * 7:x}" for n in range(1, 200)]
    assert len({by_64.pick(ClientInfo(address, 0), workers) for address in rotating}) == 1
    assert len({IPHashBalancer().pick(ClientInfo(address, 0), workers) for address in rotating}) > 1
    subnet = [f"198.51.100.{n}" for n in range(256)]
    assert len({by_24.pick(ClientInfo(address, 0), workers) for address in subnet}) == 1
    assert by_24.pick(ClientInfo("::ffff:198.51.100.9", 0), workers) == by_24.pick(ClientInfo(subnet[0], 0), workers)
    # Different networks still spread.
    networks = [f"10.{n // 256}.{n % 256}.1" for n in range(2000)]
    assert len({by_24.pick(ClientInfo(address, 0), workers) for address in networks}) == 16
    for bad in ({"ipv4_prefix": 33}, {"ipv6_prefix": -1}, {"ipv4_prefix": True}):
        with pytest.raises(ValueError, match="prefix length"):
            IPHashBalancer(**bad)


def test_random_picks_only_alive_slots_and_all_of_them() -> None:
    balancer = RandomBalancer(seed=1)
    workers = WorkerSet(5, (0, 2, 4))
    picks = collections.Counter(balancer.pick(ClientInfo("127.0.0.1", 1), workers) for _ in range(3000))
    assert set(picks) == {0, 2, 4}
    assert min(picks.values()) > 800


def test_least_connections_picks_the_emptiest_alive_slot_and_rotates_ties() -> None:
    balancer = LeastConnectionsBalancer()
    counts = [5, 1, 0, 9]
    workers = WorkerSet(4, (0, 1, 3), counts)  # slot 2 has the fewest but is not alive
    assert {balancer.pick(ClientInfo("127.0.0.1", 1), workers) for _ in range(10)} == {1}
    counts[:] = [2, 2, 0, 2]
    picks = [balancer.pick(ClientInfo("127.0.0.1", 1), workers) for _ in range(6)]
    assert sorted(set(picks)) == [0, 1, 3]  # a tie is shared, not always the lowest slot
