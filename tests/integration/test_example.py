"""The README's example, run as a user runs it: python example/server.py, then HTTP clients."""

from __future__ import annotations

import http.client
import json
import re
import sys
from pathlib import Path

from .harness import CLIENT_IPS, REPO, ServerProcess, pid_alive, wait_until


def get(port: int, source: str) -> str:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=15, source_address=(source, 0))
    try:
        connection.request("GET", "/")
        response = connection.getresponse()
        assert response.status == 200
        return response.read().decode()
    finally:
        connection.close()


def test_example_server_is_sticky_and_stops_cleanly(tmp_path: Path) -> None:
    server = ServerProcess(
        [sys.executable, "example/server.py", "0"], pid_dir=tmp_path, cwd=REPO, marker="example/server.py"
    )
    try:
        port = int(server.wait_for(r"listening on \[::\]:(\d+) with 4 workers").group(1))
        pages = {ip: [get(port, ip) for _ in range(3)] for ip in CLIENT_IPS}
        first_lines = {ip: {page.splitlines()[0] for page in seen} for ip, seen in pages.items()}
        assert all(len(lines) == 1 for lines in first_lines.values()), first_lines
        answers = {next(iter(lines)) for lines in first_lines.values()}
        assert all(re.fullmatch(r"worker [0-3] pid \d+", answer) for answer in answers), answers
        assert len(answers) > 1

        # The channel: every worker reports its connections, the master broadcasts the totals.
        def totals() -> dict[str, int]:
            page = get(port, CLIENT_IPS[0])
            return dict(json.loads(page.splitlines()[1].removeprefix("connections per worker: ")))

        made = 3 * len(CLIENT_IPS)
        assert wait_until(lambda: sum(totals().values()) >= made, timeout=15, interval=0.05)
        assert set(totals()) == {line.split()[1] for line in answers}
        workers = server.worker_pids()
        assert len(workers) == 4
        assert server.stop(timeout=40) == 0
        assert wait_until(lambda: not any(pid_alive(pid) for pid in workers), timeout=5)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(10)
        left = server.leftovers()
        server.kill_leftovers(left)
        assert not left
