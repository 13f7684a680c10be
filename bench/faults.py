"""Faults under load, on both paths: a SIGKILL storm and SIGHUP reloads, with what clients saw.

    python bench/faults.py [--paths kernel,master] [--workers 4] [--threads 8]

The server is the integration tests' line app (``tests/integration/apps/line_app.py``)
with 4 workers; 8 client threads, each from its own 127.0.0.x address, open a new
connection per request, send a line and wait for its answer (5 s at most). Each
connection ends one way: answered, refused (nothing listened), or lost (reset or
closed without an answer: it was in the hands of a worker that died).

  storm   SIGKILL a random worker every 0.5 s for 15 s (30 kills); the master
          restarts each. Only the connections the killed workers held may be lost.
  reload  three SIGHUPs 0.3 s apart under the same load; nothing may be lost.

Prints, per path and fault: answered, refused, lost, and the kills or reloads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import random
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
LINE_APP = REPO / "tests" / "integration" / "apps" / "line_app.py"


class Load:
    """``threads`` client threads making one-request connections until stopped."""

    def __init__(self, port: int, threads: int) -> None:
        self.port = port
        self.counts = {"answered": 0, "refused": 0, "lost": 0}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.threads = [threading.Thread(target=self.run, args=(f"127.0.0.{n + 2}",)) for n in range(threads)]

    def run(self, source: str) -> None:
        while not self.stopping.is_set():
            outcome = "answered"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=5, source_address=(source, 0)) as sock:
                    sock.sendall(b"hello\n")
                    data = b""
                    while not data.endswith(b"\n"):
                        chunk = sock.recv(4096)
                        if not chunk:
                            outcome = "lost"
                            break
                        data += chunk
            except ConnectionRefusedError:
                outcome = "refused"
            except OSError:
                outcome = "lost"
            with self.lock:
                self.counts[outcome] += 1

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(10)


class Server:
    def __init__(self, steering: str, workers: int) -> None:
        self.pid_dir = tempfile.mkdtemp(prefix="sticky-faults-")
        env = {
            **os.environ,
            "APP_WORKERS": str(workers),
            "APP_STEERING": steering,
            "APP_PID_DIR": self.pid_dir,
            "APP_GRACEFUL": "5",
            "PYTHONUNBUFFERED": "1",
        }
        self.process = subprocess.Popen(
            [sys.executable, str(LINE_APP)], env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith("LISTENING "):
                self.port = int(line.split()[2])
                break
        threading.Thread(target=self.process.stdout.read, daemon=True).start()

    def workers(self) -> list[int]:
        # line_app leaves a file per process: master-PID, worker0-PID, worker1-PID, ...
        return [int(name.split("-")[1]) for name in os.listdir(self.pid_dir) if name.startswith("worker")]

    def live_workers(self) -> list[int]:
        return [pid for pid in self.workers() if Path(f"/proc/{pid}").exists()]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGTERM)
        try:
            self.process.wait(30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        for pid in self.workers():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def storm(server: Server) -> str:
    """SIGKILL a random worker every 0.5 s for 15 s."""
    kills = 0
    for _ in range(30):
        victims = server.live_workers()
        if victims:
            with contextlib.suppress(ProcessLookupError):
                os.kill(random.choice(victims), signal.SIGKILL)
                kills += 1
        time.sleep(0.5)
    return f"storm:  {kills} kills"


def reload(server: Server) -> str:
    """Three SIGHUPs 0.3 s apart."""
    for _ in range(3):
        server.process.send_signal(signal.SIGHUP)
        time.sleep(0.3)
    time.sleep(4)
    return "reload: 3 SIGHUPs"


def under_load(fault: Callable[[Server], str], steering: str, workers: int, threads: int) -> str:
    """``fault`` on a fresh server under the clients' load; what the clients saw."""
    server = Server(steering, workers)
    try:
        with Load(server.port, threads) as load:
            time.sleep(1)
            done = fault(server)
            time.sleep(1)
    finally:
        server.stop()
    return f"{steering:6} {done}; {_outcomes(load.counts)}"


def _outcomes(counts: dict[str, int]) -> str:
    return f"answered {counts['answered']:,}, refused {counts['refused']}, lost {counts['lost']}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--paths", default="kernel,master")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    for steering in args.paths.split(","):
        for fault in (storm, reload):
            print(under_load(fault, steering, args.workers, args.threads), flush=True)


if __name__ == "__main__":
    main()
