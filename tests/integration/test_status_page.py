"""The status page on the --metrics address, looked at in headless Chromium as a person would.

The command serves a line worker with 3 workers; clients from several addresses
connect, one worker is killed (a restart, and a warning in the master's log); then
Chromium loads ``http://METRICS/``: the page lists every worker with its live
connections, the totals and rates, the restart and the recent warning, and refreshes
itself. The screenshot is kept in ``tests/artifacts/`` (or ``$STICKY_TEST_ARTIFACTS``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, REPO, free_port, wait_until

ARTIFACTS = Path(os.environ.get("STICKY_TEST_ARTIFACTS") or REPO / "tests" / "artifacts")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def chromium() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed for the browser test; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return found


def test_the_status_page_in_headless_chromium(start_app: StartApp, tmp_path: Path) -> None:
    browser = chromium()
    metrics = free_port()
    server = start_app(
        command=[
            sys.executable,
            "-m",
            "sticky_server",
            "apps.cli_apps:HoldingWorker",
            "-w",
            "3",
            "-b",
            "127.0.0.1:0",
            "--metrics",
            f"127.0.0.1:{metrics}",
        ],
        cwd=HERE,
    )
    port = int(server.wait_for(r"listening on 127\.0\.0\.1:(\d+) with", 60).group(1))
    held = [socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(ip, 0)) for ip in CLIENT_IPS[:9]]
    try:
        victim = int(server.wait_for(r"worker 1 started \(pid (\d+)\)").group(1))
        os.kill(victim, signal.SIGKILL)
        server.wait_for(rf"worker 1 \(pid {victim}\) was killed by SIGKILL")

        def all_ready() -> bool:
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics}/stats", timeout=5) as answer:
                return b'"ready": false' not in answer.read()

        assert wait_until(all_ready, 30)
        url = f"http://127.0.0.1:{metrics}/"
        profile = tmp_path / "profile"
        dom = subprocess.run(
            [browser, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", "--dump-dom", url],
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        shot = ARTIFACTS / "status_page.png"
        subprocess.run(
            [
                browser,
                *CHROMIUM_FLAGS,
                f"--user-data-dir={profile}",
                "--window-size=1100,700",
                f"--screenshot={shot}",
                url,
            ],
            capture_output=True,
            timeout=60,
            check=True,
        )
    finally:
        for sock in held:
            sock.close()
    assert shot.stat().st_size > 5000  # a rendered page, not a blank one
    assert '<meta http-equiv="refresh"' in dom
    rows = re.findall(r"<tr><td>(\d+)</td><td>(\d+)</td><td class=\"left\">ready</td>", dom)
    assert [slot for slot, _ in rows] == ["0", "1", "2"], dom
    assert "1</b> restarts" in dom
    assert re.search(r'id="live">\d+</b> live connections', dom)
    assert re.search(r'id="accept-rate">[\d.]+</span>/s', dom)
    assert "was killed by SIGKILL" in dom  # the recent warnings and errors
