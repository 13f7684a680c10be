"""The built-in strategies: balance, minimal movement, address normalisation, and the cache."""

from __future__ import annotations

import collections
import ipaddress
import random

import pytest

from sticky_server import Balancer, ClientInfo, IPHashBalancer, RoundRobinBalancer, WorkerSet
from sticky_server.balancer import IP_CACHE_SIZE, address_key, balancer_from

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


def test_ip_hash_balances_100k_addresses_within_10_percent(placement: tuple[list[int], list[int]]) -> None:
    _, slots = placement
    counts = collections.Counter(slots)
    mean = len(slots) / WORKERS
    assert set(counts) == set(ALL)
    assert all(abs(count - mean) <= 0.10 * mean for count in counts.values()), counts


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
    with pytest.raises(ValueError, match="unknown balancer 'fastest'; use one of: ip-hash, round-robin"):
        balancer_from("fastest")
    with pytest.raises(TypeError, match="not int"):
        balancer_from(3)  # type: ignore[arg-type]


def test_custom_balancer_needs_pick() -> None:
    class Incomplete(Balancer):
        pass

    with pytest.raises(TypeError, match="pick"):
        Incomplete()  # type: ignore[abstract]
