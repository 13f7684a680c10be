"""Kernel steering: the kernel's choice, on real sockets, is IPHashBalancer's (Linux; the master path elsewhere)."""

from __future__ import annotations

import errno
import random
import select
import socket
import sys

import pytest

from sticky_server import IPHashBalancer, LeastConnectionsBalancer
from sticky_server.balancer import address_key
from sticky_server.errors import BindError
from sticky_server.listener import Bind
from sticky_server.steering import KernelSteering, kernel_path_unavailable, open_kernel_steering
from sticky_server.steering.bpf import MAX_INSTRUCTIONS, rendezvous_program
from sticky_server.steering.group import ListenerGroup, queue_length

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel steering is Linux's")


def random_loopback_sources(count: int, seed: int) -> list[str]:
    """Distinct addresses spread over 127.0.0.0/8 (Linux routes all of it to lo)."""
    rng = random.Random(seed)
    sources: set[str] = set()
    while len(sources) < count:
        sources.add(f"127.{rng.randrange(256)}.{rng.randrange(256)}.{rng.randrange(1, 255)}")
    return sorted(sources)


def kernel_choice(steering: KernelSteering, source: str, target: str) -> int:
    """The slot whose listener the kernel put a connection from ``source`` on."""
    family = socket.AF_INET6 if ":" in source else socket.AF_INET
    port = steering.groups[0].address[1]
    listeners = steering.groups[0].listeners
    with socket.socket(family, socket.SOCK_STREAM) as client:
        client.bind((source, 0))
        client.connect((target, port))
        ready, _, _ = select.select(listeners, [], [], 5)
        assert len(ready) == 1, f"{source}: {len(ready)} listeners got the connection"
        conn, _ = ready[0].accept()
        conn.close()
        return listeners.index(ready[0])


def expected(balancer: IPHashBalancer, source: str, alive: tuple[int, ...]) -> int:
    return balancer.slot_for_key(address_key(source, balancer.ipv4_prefix, balancer.ipv6_prefix), alive)


@linux_only
@pytest.mark.parametrize(
    ("workers", "alive", "prefixes"),
    [
        (4, (0, 1, 2, 3), (32, 128)),
        (4, (0, 2, 3), (32, 128)),  # one slot left out: its clients go to their second choice
        (5, (1, 2, 3, 4), (24, 64)),  # prefix options: a whole /24 keys alike
    ],
    ids=["all-alive", "one-left-out", "prefixes"],
)
def test_the_kernel_chooses_what_ip_hash_chooses_for_500_addresses(
    workers: int, alive: tuple[int, ...], prefixes: tuple[int, int]
) -> None:
    balancer = IPHashBalancer(ipv4_prefix=prefixes[0], ipv6_prefix=prefixes[1])
    steering = open_kernel_steering([Bind("127.0.0.1", 0)], workers, balancer)
    try:
        steering.steer(alive)
        sources = random_loopback_sources(500, seed=workers * 100 + len(alive))
        chosen = {source: kernel_choice(steering, source, "127.0.0.1") for source in sources}
        wanted = {source: expected(balancer, source, alive) for source in sources}
        assert chosen == wanted
        assert set(chosen.values()) == set(alive)  # every included slot got clients, no left-out one did
    finally:
        steering.close()


@linux_only
@pytest.mark.skipif(not socket.has_dualstack_ipv6(), reason="needs a dual-stack IPv6 socket")
@pytest.mark.parametrize("alive", [(0, 1, 2), (0, 2)], ids=["all-alive", "one-left-out"])
def test_a_dual_stack_listener_steers_ipv6_and_ipv4_clients_as_ip_hash_does(alive: tuple[int, ...]) -> None:
    balancer = IPHashBalancer()
    steering = open_kernel_steering([Bind(None, 0)], 3, balancer)
    try:
        steering.steer(alive)
        assert kernel_choice(steering, "::1", "::1") == expected(balancer, "::1", alive)
        for source in random_loopback_sources(250, seed=len(alive)):
            # An IPv4 client of an IPv6 socket is ::ffff:a.b.c.d to Python and an IPv4 packet to the program.
            assert kernel_choice(steering, source, "127.0.0.1") == expected(balancer, f"::ffff:{source}", alive)
    finally:
        steering.close()


@linux_only
def test_listeners_keep_their_slot_order_as_the_group_grows() -> None:
    group = ListenerGroup(Bind("127.0.0.1", 0))
    try:
        first = group.listener(0)
        third = group.listener(2)
        assert group.listeners[0] is first and group.listeners[2] is third and len(group.listeners) == 3
        assert {listener.getsockname() for listener in group.listeners} == {group.address}
        assert queue_length(first) == 0
        with socket.create_connection(group.address[:2]):
            pass  # waits on one of the listeners (no program: the kernel's own hash)
        assert sum(queue_length(listener) for listener in group.listeners) == 1
    finally:
        group.close()


@linux_only
@pytest.mark.parametrize("reuse_port", [False, True], ids=["plain", "reuseport"])
def test_a_port_another_server_listens_on_is_refused_not_shared(reuse_port: bool) -> None:
    with socket.socket() as other:
        if reuse_port:  # a server of the same user that would otherwise join the group
            other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        other.bind(("127.0.0.1", 0))
        other.listen()
        with pytest.raises(BindError, match="already in use") as caught:
            ListenerGroup(Bind("127.0.0.1", other.getsockname()[1]))
        assert caught.value.errno == errno.EADDRINUSE


def test_the_program_fits_the_kernel_up_to_two_hundred_slots() -> None:
    assert len(rendezvous_program(range(16))) <= 400
    assert len(rendezvous_program(tuple(range(200)))) <= MAX_INSTRUCTIONS
    with pytest.raises(ValueError, match="over the kernel's 4096"):
        rendezvous_program(tuple(range(300)))
    with pytest.raises(ValueError, match="at least one alive slot"):
        rendezvous_program(())


@pytest.mark.parametrize(
    ("steering", "balancer", "binds", "headers", "reason"),
    [
        ("master", IPHashBalancer(), [Bind("127.0.0.1", 0)], False, "steering='master'"),
        ("auto", IPHashBalancer(), [Bind("127.0.0.1", 0)], True, "proxy header"),
        ("auto", LeastConnectionsBalancer(), [Bind("127.0.0.1", 0)], False, "LeastConnectionsBalancer"),
        ("auto", IPHashBalancer(), [Bind(None, 0, "/tmp/s.sock")], False, "Unix socket"),
        ("auto", IPHashBalancer(), [Bind(None, 0, None, 3)], False, "fd://"),
    ],
)
def test_what_keeps_connections_on_the_master_path_is_named(
    steering: str, balancer: IPHashBalancer, binds: list[Bind], headers: bool, reason: str
) -> None:
    why = kernel_path_unavailable(steering, balancer, binds, headers)
    assert why is not None
    if sys.platform.startswith("linux") or steering == "master":
        assert reason in why


@linux_only
def test_ip_hash_over_tcp_binds_takes_the_kernel_path() -> None:
    binds = [Bind("127.0.0.1", 0), Bind(None, 0)]
    assert kernel_path_unavailable("auto", IPHashBalancer(ipv6_prefix=64), binds, False) is None
    assert kernel_path_unavailable("kernel", IPHashBalancer(), binds, False) is None


def test_kernel_path_is_not_taken_on_other_systems(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    why = kernel_path_unavailable("auto", IPHashBalancer(), [Bind("127.0.0.1", 0)], False)
    assert why == "kernel steering needs Linux (this is darwin)"
