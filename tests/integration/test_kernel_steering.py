"""The kernel path's own promises: what the master does while the kernel steers (the shared ones run on both
paths, with the ``steering`` fixture, in the other files)."""

from __future__ import annotations

import ctypes
import json
import os
import signal
import socket
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from sticky_server.balancer import IPHashBalancer, address_key
from sticky_server.steering.group import listening_inodes

from .conftest import StartApp
from .harness import CLIENT_IPS, ServerProcess, pid_alive, read_reply, request, wait_until

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="kernel steering is Linux's")

TIMEOUT = 30


def slots_of(ips: list[str], alive: tuple[int, ...]) -> dict[str, int]:
    hasher = IPHashBalancer()
    return {ip: hasher.slot_for_key(address_key(ip), alive) for ip in ips}


def stats(server: ServerProcess) -> dict[str, Any]:
    mark = len(server.lines)
    server.send_signal(signal.SIGUSR1)
    figures: dict[str, Any] = json.loads(server.wait_for(r"^STATS (.*)$", TIMEOUT, start=mark).group(1))
    return figures


def test_workers_accept_their_own_clients_and_the_stats_count_them(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "3"})
    address = server.wait_listening()
    server.wait_for(r"with 3 workers \(master pid \d+\) on the kernel path")
    wanted = slots_of(CLIENT_IPS, (0, 1, 2))
    for ip in CLIENT_IPS:
        assert request(address, source=ip)["slot"] == wanted[ip]

    def counted() -> bool:  # workers report what they accepted with their close sweep (0.5 s)
        figures = stats(server)
        return bool(figures["accepted"] == figures["handed_off"] == len(CLIENT_IPS))

    assert wait_until(counted, timeout=TIMEOUT, interval=0.3)
    figures = stats(server)
    assert figures["steering"] == "kernel"
    per_slot = {worker["slot"]: worker["handed_off"] for worker in figures["workers"]}
    assert per_slot == {slot: list(wanted.values()).count(slot) for slot in range(3)}
    assert wait_until(lambda: stats(server)["live"] == 0, timeout=TIMEOUT, interval=0.3)  # all closed again


@pytest.mark.parametrize("kernel", ["takes every program", "refuses a new program"])
def test_a_stuck_workers_queued_clients_are_served_by_the_others(start_app: StartApp, kernel: str) -> None:
    """Also when the kernel refuses the program that leaves the stuck slot out (past about 220 slots it
    would): the stale program still sends its clients there, and the master drains them from the alive set."""
    env = {"APP_WORKERS": "2", "APP_TIMEOUT": "0"}  # no heartbeat: the queue gives it away
    if kernel == "refuses a new program":
        env["APP_REFUSE_RESTEER"] = "1"
    server = start_app(env)
    address = server.wait_listening()
    wanted = slots_of(CLIENT_IPS, (0, 1))
    stuck_ips = [ip for ip in CLIENT_IPS if wanted[ip] == 0]
    victim = request(address, source=stuck_ips[0])
    os.kill(victim["pid"], signal.SIGSTOP)
    held: list[socket.socket] = []
    try:
        for n in range(300):  # past BACKED_UP_QUEUE, queued on the stopped worker's listener
            sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(stuck_ips[n % len(stuck_ips)], 0))
            sock.sendall(f"q{n}\n".encode())
            held.append(sock)
        server.wait_for(r"worker 0 \(pid \d+\) leaves \d+ connections waiting on its listener", TIMEOUT)
        if kernel == "refuses a new program":
            server.wait_for(r"ERROR the kernel refused the steering program .* the master drains", TIMEOUT)
        replies = [read_reply(sock) for sock in held]  # every one, from its next choice
        assert [reply["line"] for reply in replies] == [f"q{n}" for n in range(300)]
        assert {reply["slot"] for reply in replies} == {1}
        assert request(address, source=stuck_ips[0])["slot"] == 1  # and new ones too, while it is stuck
    finally:
        os.kill(victim["pid"], signal.SIGCONT)
        for sock in held:
            sock.close()
    # Heard from again (its close sweep), the worker gets its own clients back.
    assert wait_until(lambda: request(address, source=stuck_ips[0])["slot"] == 0, timeout=TIMEOUT, interval=0.2)


def test_a_starting_workers_clients_go_to_their_next_choice_at_once(start_app: StartApp, tmp_path: Path) -> None:
    stall = tmp_path / "stall-boot"
    server = start_app({"APP_WORKERS": "2", "APP_STALL_BOOT_FILE": str(stall)})
    address = server.wait_listening()
    wanted = slots_of(CLIENT_IPS, (0, 1))
    victim = request(address, source=CLIENT_IPS[0])
    victims = [ip for ip in CLIENT_IPS if wanted[ip] == victim["slot"]]
    stall.touch()
    mark = len(server.lines)
    os.kill(victim["pid"], signal.SIGKILL)
    stalled = int(server.wait_for(rf"STALLED {victim['slot']} (\d+)", timeout=TIMEOUT, start=mark).group(1))
    try:
        with ThreadPoolExecutor(len(victims)) as pool:  # the stalled worker never takes them: the master does
            replies = list(pool.map(lambda ip: request(address, ip, f"moved-{ip}"), victims))
        assert [reply["line"] for reply in replies] == [f"moved-{ip}" for ip in victims]
        assert all(reply["slot"] != victim["slot"] for reply in replies)
    finally:
        stall.unlink()
        os.kill(stalled, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(stalled), timeout=TIMEOUT)
    assert wait_until(
        lambda: request(address, source=CLIENT_IPS[0])["slot"] == victim["slot"], timeout=TIMEOUT, interval=0.2
    )


def test_graceful_stop_serves_every_connection_queued_on_any_listener(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_GRACEFUL": "20"})
    address = server.wait_listening()
    pids = server.worker_pids()
    for pid in pids:  # nobody accepts: every connection waits in a listener's queue
        os.kill(pid, signal.SIGSTOP)
    held: list[socket.socket] = []
    try:
        for n in range(60):
            sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(CLIENT_IPS[n % 20], 0))
            sock.sendall(f"g{n}\n".encode())
            held.append(sock)
        server.send_signal(signal.SIGTERM)
        server.wait_for(r"SIGTERM: stopping", TIMEOUT)
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)
    replies = [read_reply(sock) for sock in held]
    assert [reply["line"] for reply in replies] == [f"g{n}" for n in range(60)]
    for sock in held:
        sock.close()
    assert server.wait_exit(TIMEOUT) == 0


def test_what_the_kernel_cannot_do_goes_through_the_master_and_says_why(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1"})
    server.wait_for(r"connections go through the master: the master reads each client's address from a proxy header")
    server.wait_for(r"with 2 workers \(master pid \d+\) on the master path")
    refused = start_app({"APP_WORKERS": "2", "APP_BALANCER": "round-robin", "APP_STEERING": "kernel"})
    assert refused.wait_exit(TIMEOUT) != 0
    refused.wait_for(
        r"steering='kernel' is not possible here: the balancer is RoundRobinBalancer; "
        r"the kernel computes only IPHashBalancer's choice. Use steering='auto' or 'master'"
    )


def test_a_reload_keeps_every_client_on_its_slot_and_loses_nothing(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2"})
    address = server.wait_listening()
    before = {ip: request(address, source=ip) for ip in CLIENT_IPS}
    mark = len(server.lines)
    server.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + TIMEOUT
    while server.count(r"worker \d replaced: pid") < 2 and time.monotonic() < deadline:
        for ip in CLIENT_IPS[:6]:  # served all along, on its own slot
            assert request(address, source=ip)["slot"] == before[ip]["slot"]
    for slot in range(2):
        server.wait_for(rf"worker {slot} replaced", TIMEOUT, start=mark)
    after = {ip: request(address, source=ip) for ip in CLIENT_IPS}
    assert {ip: reply["slot"] for ip, reply in after.items()} == {ip: reply["slot"] for ip, reply in before.items()}
    assert not {reply["pid"] for reply in after.values()} & {reply["pid"] for reply in before.values()}


def _take_listener(pid: int, address: tuple[str, int]) -> socket.socket:
    """A copy of the listener process ``pid`` holds on ``address`` (pidfd_getfd: root, or the same user)."""
    inodes = {f"socket:[{inode}]" for inode in listening_inodes(address)}
    fd = next(int(n) for n in os.listdir(f"/proc/{pid}/fd") if os.readlink(f"/proc/{pid}/fd/{n}") in inodes)
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = libc.syscall(434, pid, 0)  # pidfd_open
    assert pidfd >= 0, os.strerror(ctypes.get_errno())
    try:
        taken = libc.syscall(438, pidfd, fd, 0)  # pidfd_getfd
        if taken < 0:
            pytest.skip(f"pidfd_getfd: {os.strerror(ctypes.get_errno())}")
    finally:
        os.close(pidfd)
    return socket.socket(fileno=taken)


@pytest.mark.skipif(os.geteuid() != 0, reason="takes a worker's listener with pidfd_getfd (root)")
def test_a_listener_shut_down_from_outside_costs_that_listener_and_that_worker_only(start_app: StartApp) -> None:
    """What a worker without its lock-down could do (before it: the master died, or lost stickiness for good).

    The test takes a worker's copy of its listener and shuts it down, as the worker's own
    code could have: the master replaces that listener and that worker, the program
    follows the group's new order, every client is back on its slot, and the master
    stops cleanly. Slot 1 first, then slot 0 (through whose listener the program used to
    be attached).
    """
    server = start_app({"APP_WORKERS": "3", "APP_STEERING": "kernel"})
    address = server.wait_listening()
    wanted = slots_of(CLIENT_IPS, (0, 1, 2))
    for slot in (1, 0):
        victim = request(address, source=next(ip for ip in CLIENT_IPS if wanted[ip] == slot))
        mark = len(server.lines)
        with _take_listener(victim["pid"], address) as listener:
            listener.shutdown(socket.SHUT_RDWR)
        server.wait_for(rf"worker {slot}'s listener stopped listening", TIMEOUT, start=mark)
        server.wait_for(rf"worker {slot} replaced: pid \d+ now, pid {victim['pid']} finishing", TIMEOUT, start=mark)

        def all_home() -> bool:
            return all(request(address, source=ip)["slot"] == wanted[ip] for ip in CLIENT_IPS)

        assert wait_until(all_home, timeout=TIMEOUT, interval=0.2)
    assert server.process.poll() is None
    assert server.stop() == 0


def test_sigttin_is_refused_while_a_stranger_listens_in_the_group(start_app: StartApp) -> None:
    """A process of the same user joining the port after start would get the new slot's clients: no new slot."""
    server = start_app({"APP_WORKERS": "2", "APP_STEERING": "kernel"})
    address = server.wait_listening()
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    stranger.bind(address)
    stranger.listen(16)
    stranger.setblocking(False)
    try:
        server.send_signal(signal.SIGTTIN)
        server.wait_for(r"SIGTTIN refused: process .* listens on 127\.0\.0\.1:\d+ in this server's SO_REUSEPORT group")
        assert server.count("SIGTTIN: 3 workers now") == 0
        wanted = slots_of(CLIENT_IPS, (0, 1))
        for ip in CLIENT_IPS:
            assert request(address, source=ip)["slot"] == wanted[ip]
        with pytest.raises(BlockingIOError):
            stranger.accept()  # it got none of them
    finally:
        stranger.close()
    server.send_signal(signal.SIGTTIN)  # with the stranger gone, the server grows
    server.wait_for(r"SIGTTIN: 3 workers now")
    assert server.stop() == 0
