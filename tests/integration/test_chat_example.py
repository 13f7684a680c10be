"""The socket.io chat example as a person runs it: terminal clients from chosen addresses, and the web page.

Two terminal clients pick their source address (``--source``) so that they land on
different workers, and hear each other. Then the page, in headless Chromium
(Debian's package, driven by playwright-core from npm), is opened twice: both pages
connect, upgrade to websocket and see each other's lines, and a terminal client on
another worker hears them too.
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, expected_slot, stop_process

CHAT = HERE.parent.parent / "example" / "socketio_chat"
WORKERS = 4
TIMEOUT = 20.0


class ChatClient:
    """example/socketio_chat/chat_client.py in a subprocess: lines typed on stdin, lines heard on stdout."""

    def __init__(self, name: str, port: int, source: str) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(CHAT / "chat_client.py"), name, str(port), "--source", source],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: queue.Queue[str] = queue.Queue()
        self.heard: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))

    def wait_for(self, text: str) -> str:
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"never saw {text!r}; heard {self.heard}") from None
            self.heard.append(line)
            if text in line:
                return line

    def say(self, text: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(text + "\n")
        self.process.stdin.flush()

    def close(self) -> None:
        if self.process.stdin is not None and not self.process.stdin.closed:
            self.process.stdin.close()  # Ctrl-D: the client disconnects and exits
        try:
            self.process.wait(TIMEOUT)
        except subprocess.TimeoutExpired:
            stop_process(self.process)


def sources_on_different_workers() -> tuple[str, str]:
    first = CLIENT_IPS[0]
    second = next(ip for ip in CLIENT_IPS if expected_slot(ip, WORKERS) != expected_slot(first, WORKERS))
    return first, second


def start_chat(start_app: StartApp, *flags: str) -> int:
    server = start_app(command=[sys.executable, str(CHAT / "chat_server.py"), "0", *flags])
    return int(server.wait_for(r"chat on http://127\.0\.0\.1:(\d+)/", 60).group(1))


def test_terminal_clients_on_different_workers_hear_each_other(start_app: StartApp) -> None:
    port = start_chat(start_app)
    carol_ip, dave_ip = sources_on_different_workers()
    carol, dave = ChatClient("carol", port, carol_ip), ChatClient("dave", port, dave_ip)
    try:
        assert f"from {carol_ip} to worker {expected_slot(carol_ip, WORKERS)}" in carol.wait_for("connected")
        assert f"from {dave_ip} to worker {expected_slot(dave_ip, WORKERS)}" in dave.wait_for("connected")
        carol.say("hi dave")
        assert dave.wait_for("carol: hi dave") == f"[worker {expected_slot(carol_ip, WORKERS)}] carol: hi dave"
        dave.say("hi carol")
        assert carol.wait_for("dave: hi carol") == f"[worker {expected_slot(dave_ip, WORKERS)}] dave: hi carol"
    finally:
        carol.close()
        dave.close()
    assert carol.process.returncode == 0 and dave.process.returncode == 0


def find_chromium() -> str:
    chromium = os.environ.get("CHROMIUM") or shutil.which("chromium")
    if chromium is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is needed for the browser test; .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium is not installed (apt-get install chromium)")
    return chromium


def open_pages(node_clients: Path, port: int, chromium: str, names: str = "alice,bob") -> Any:
    done = subprocess.run(
        ["node", str(node_clients / "chat_page.js"), f"http://127.0.0.1:{port}/", names],
        capture_output=True,
        text=True,
        timeout=90,
        check=True,
        env={**os.environ, "CHROMIUM": chromium},
    )
    pages = json.loads(done.stdout)
    assert "fatal" not in pages, pages["fatal"]
    return pages


def test_the_chat_page_in_headless_chromium(start_app: StartApp, node_clients: Path) -> None:
    chromium = find_chromium()
    port = start_chat(start_app)
    # The browser connects from 127.0.0.1; a terminal client on another worker must hear the pages too.
    carol_ip = next(ip for ip in CLIENT_IPS if expected_slot(ip, WORKERS) != expected_slot("127.0.0.1", WORKERS))
    carol = ChatClient("carol", port, carol_ip)
    try:
        carol.wait_for("connected")
        pages = open_pages(node_clients, port, chromium)
        browser_worker = expected_slot("127.0.0.1", WORKERS)
        for name in ("alice", "bob"):
            assert f"to worker {browser_worker}" in pages[name]["status"], pages
            assert sorted(pages[name]["heard"]) == [
                f"[worker {browser_worker}] alice: hello from alice",
                f"[worker {browser_worker}] bob: hello from bob",
            ], pages
        assert carol.wait_for("alice: hello from alice") == f"[worker {browser_worker}] alice: hello from alice"
        assert carol.wait_for("bob: hello from bob")
    finally:
        carol.close()


def test_three_tabs_of_one_browser_spread_over_workers_by_session(start_app: StartApp, node_clients: Path) -> None:
    """``--route-by engineio``: one browser, one address, one connection pool; each tab its own worker."""
    port = start_chat(start_app, "--route-by", "engineio")
    names = ["alice", "bob", "carol"]
    pages = open_pages(node_clients, port, find_chromium(), ",".join(names))
    workers = {name: pages[name]["status"].rsplit(" ", 1)[-1] for name in names}
    assert len(set(workers.values())) == 3, pages
    for name in names:
        assert sorted(pages[name]["heard"]) == sorted(f"[worker {workers[n]}] {n}: hello from {n}" for n in names)
