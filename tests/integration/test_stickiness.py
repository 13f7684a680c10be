"""Must hold 1 and 2: one client address, one worker; a dead worker's clients move, and only they."""

from __future__ import annotations

import collections
import os
import signal
from pathlib import Path

from sticky_server.balancer import IPHashBalancer, address_key

from .conftest import StartApp
from .harness import CLIENT_IPS, pid_alive, request, wait_until


def slots_by_ip(address: tuple[str, int], ips: list[str], rounds: int) -> dict[str, set[int]]:
    seen: dict[str, set[int]] = collections.defaultdict(set)
    for _ in range(rounds):
        for ip in ips:
            seen[ip].add(request(address, source=ip)["slot"])
    return seen


def test_every_address_always_meets_the_same_worker(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "4"})
    address = server.wait_listening()

    seen = slots_by_ip(address, CLIENT_IPS, rounds=5)

    assert len(seen) == len(CLIENT_IPS) >= 16
    assert all(len(slots) == 1 for slots in seen.values()), seen
    used = {next(iter(slots)) for slots in seen.values()}
    assert len(used) > 1, f"every address landed on one worker: {seen}"
    # And it is the documented hash, not an accident of this run.
    expected = {ip: IPHashBalancer().slot_for_key(address_key(ip), (0, 1, 2, 3)) for ip in CLIENT_IPS}
    assert {ip: next(iter(slots)) for ip, slots in seen.items()} == expected


def test_a_dead_slots_clients_move_and_come_back_and_nobody_else_moves(
    start_app: StartApp, steering: str, tmp_path: Path
) -> None:
    fail_boot = tmp_path / "fail-boot"
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "4", "APP_FAIL_BOOT_FILE": str(fail_boot)})
    address = server.wait_listening()
    before = {ip: request(address, source=ip) for ip in CLIENT_IPS}
    counts = collections.Counter(reply["slot"] for reply in before.values())
    victim_slot, _ = counts.most_common(1)[0]
    victim_pid = next(reply["pid"] for reply in before.values() if reply["slot"] == victim_slot)
    victims = [ip for ip, reply in before.items() if reply["slot"] == victim_slot]
    others = [ip for ip in CLIENT_IPS if ip not in victims]

    # The slot's next workers fail at start-up, so it stays without a worker for a while.
    fail_boot.touch()
    os.kill(victim_pid, signal.SIGKILL)
    assert wait_until(lambda: not pid_alive(victim_pid), timeout=10)

    hasher = IPHashBalancer()
    remaining = tuple(slot for slot in range(4) if slot != victim_slot)
    for _ in range(3):
        for ip in victims:
            reply = request(address, source=ip)
            assert reply["slot"] == hasher.slot_for_key(address_key(ip), remaining), (ip, reply)
        for ip in others:
            reply = request(address, source=ip)
            assert reply["slot"] == before[ip]["slot"] and reply["pid"] == before[ip]["pid"], (ip, reply)

    # The slot's worker starts again: exactly its old clients come back to it.
    fail_boot.unlink()

    def victims_back() -> bool:
        return all(request(address, source=ip)["slot"] == victim_slot for ip in victims)

    assert wait_until(victims_back, timeout=30, interval=0.1)
    for ip in others:
        assert request(address, source=ip)["slot"] == before[ip]["slot"]
    new_pid = request(address, source=victims[0])["pid"]
    assert new_pid != victim_pid
