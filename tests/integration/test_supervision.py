"""Must hold 4: workers are the entry script run again, crashed ones come back, and no connection is refused."""

from __future__ import annotations

import itertools
import os
import re
import signal
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from .conftest import StartApp
from .harness import CLIENT_IPS, LoadGenerator, pid_alive, request, wait_until


def test_python_dash_m_entry_point_works(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2"}, module=True)
    address = server.wait_listening()
    slots = {request(address, source=ip)["slot"] for ip in CLIENT_IPS}
    assert slots == {0, 1}
    for pid in server.worker_pids():
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        assert b"-m" in cmdline and b"apps.line_app" in cmdline


def test_crashed_worker_is_respawned_into_its_slot(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "2"})
    address = server.wait_listening()
    replies = {ip: request(address, source=ip) for ip in CLIENT_IPS}
    ip, first = next(iter(replies.items()))

    os.kill(first["pid"], signal.SIGKILL)

    server.wait_for(rf"worker {first['slot']} \(pid {first['pid']}\) was killed by SIGKILL", timeout=10)

    def back_in_its_slot() -> bool:
        reply = request(address, source=ip)
        return bool(reply["slot"] == first["slot"] and reply["pid"] != first["pid"])

    assert wait_until(back_in_its_slot, timeout=20, interval=0.05)
    # Its neighbours never moved.
    for other_ip, before in replies.items():
        if before["slot"] != first["slot"]:
            assert request(address, source=other_ip)["pid"] == before["pid"]


def test_worker_crashing_at_start_up_backs_off_instead_of_looping(
    start_app: StartApp, steering: str, tmp_path: Path
) -> None:
    fail_boot = tmp_path / "fail-boot"
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "2", "APP_FAIL_BOOT_FILE": str(fail_boot)})
    address = server.wait_listening()
    victim = request(address, source=CLIENT_IPS[0])
    fail_boot.touch()
    mark = len(server.lines)
    os.kill(victim["pid"], signal.SIGKILL)

    # Watch the slot fail at start-up four times: each wait doubles, so it never loops fast.
    boot_failure = rf"worker {victim['slot']} .* before it was ready .* restarting it in ([\d.]+) s"
    assert wait_until(lambda: server.count(boot_failure) >= 4, timeout=60, interval=0.05), server.output_tail()
    delays = [float(match.group(1)) for line in server.lines[mark:] if (match := re.search(boot_failure, line))]
    assert all(later == 2 * earlier for earlier, later in itertools.pairwise(delays[:4])), delays
    starts = server.count(rf"worker {victim['slot']} started") - 1
    assert starts <= len(delays) + 1
    # Meanwhile every client is still served, by the other slot.
    for ip in CLIENT_IPS[:8]:
        assert request(address, source=ip)["slot"] != victim["slot"]

    fail_boot.unlink()
    assert wait_until(lambda: request(address, source=CLIENT_IPS[0])["slot"] == victim["slot"], timeout=30)


def test_sigkill_under_load_refuses_and_loses_no_connection(start_app: StartApp, steering: str) -> None:
    server = start_app({"APP_STEERING": steering, "APP_WORKERS": "3"})
    address = server.wait_listening()
    with LoadGenerator(address) as load:
        for round_number in range(4):
            time.sleep(0.5)
            workers = sorted(pid for pid in server.worker_pids() if pid_alive(pid))
            assert workers, f"no live worker:\n{server.output_tail()}"
            load.disrupted()
            os.kill(workers[round_number % len(workers)], signal.SIGKILL)
        time.sleep(0.5)
    load.assert_nothing_lost()
    assert server.process.poll() is None


def test_connections_a_dying_worker_had_not_taken_go_to_another_worker(start_app: StartApp, tmp_path: Path) -> None:
    stall = tmp_path / "stall-boot"
    # The master path: connections handed to a worker that never read them (the kernel path sends
    # a starting worker's clients elsewhere at once: test_kernel_steering).
    server = start_app({"APP_STEERING": "master", "APP_WORKERS": "2", "APP_STALL_BOOT_FILE": str(stall)})
    address = server.wait_listening()
    before = {ip: request(address, source=ip) for ip in CLIENT_IPS}
    victim = before[CLIENT_IPS[0]]
    victims = [ip for ip, reply in before.items() if reply["slot"] == victim["slot"]]

    # The slot's next worker stalls before work(): alive, but it never takes a connection.
    stall.touch()
    mark = len(server.lines)
    os.kill(victim["pid"], signal.SIGKILL)
    server.wait_for(rf"worker {victim['slot']} started \(pid (\d+)\)", timeout=10, start=mark)
    stalled = int(server.wait_for(rf"STALLED {victim['slot']} (\d+)", timeout=10, start=mark).group(1))
    with ThreadPoolExecutor(len(victims)) as pool:
        waiting = [pool.submit(request, address, ip, f"owed-{ip}") for ip in victims]
        assert wait_until(lambda: server.count(r"STALLED") >= 1, timeout=5)
        time.sleep(0.3)  # let the master queue them to the stalled worker
        assert not any(future.done() for future in waiting)
        stall.unlink()
        os.kill(stalled, signal.SIGKILL)
        replies = [future.result(timeout=30) for future in waiting]

    server.wait_for(
        rf"worker {victim['slot']} \(pid {stalled}\) went away holding {len(victims)} connection", timeout=10
    )
    assert [reply["line"] for reply in replies] == [f"owed-{ip}" for ip in victims]
    assert all(reply["slot"] != victim["slot"] for reply in replies)
