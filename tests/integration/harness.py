"""Start test servers as real processes, talk to them from real sockets, and leave nothing behind."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sticky_server.balancer import IPHashBalancer, address_key

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
LINE_APP = HERE / "apps" / "line_app.py"

# Distinct client addresses on the loopback network (Linux routes all of 127/8 to lo).
CLIENT_IPS = [f"127.0.0.{n}" for n in range(2, 26)]
NODE_DIR = HERE.parent / "node"  # package.json: the npm packages the tests drive (node_clients fixture)
HAPROXY = shutil.which("haproxy") or ("/usr/sbin/haproxy" if os.path.exists("/usr/sbin/haproxy") else None)
# Frontends: tcp_v1 / tcp_v2 send PROXY headers to tcp_port; web adds X-Forwarded-For for http_backend_port.
HAPROXY_CONFIG = """
global
    maxconn 2000
defaults
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend tcp_v1
    mode tcp
    bind 127.0.0.1:{v1_port}
    default_backend sticky_v1
backend sticky_v1
    mode tcp
    server master 127.0.0.1:{tcp_port} send-proxy
frontend tcp_v2
    mode tcp
    bind 127.0.0.1:{v2_port}
    default_backend sticky_v2
backend sticky_v2
    mode tcp
    server master 127.0.0.1:{tcp_port} send-proxy-v2
frontend web
    mode http
    bind 127.0.0.1:{http_port}
    option forwardfor
    default_backend sticky_http
backend sticky_http
    mode http
    http-reuse never
    server master 127.0.0.1:{http_backend_port}
frontend web_reuse
    mode http
    bind 127.0.0.1:{reuse_port}
    option forwardfor
    timeout tunnel 60s
    default_backend sticky_reuse
backend sticky_reuse
    mode http
    balance roundrobin
    http-reuse always
    server master 127.0.0.1:{http_backend_port}
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def expected_slot(host: str, workers: int) -> int:
    """The worker the IP-hash balancer gives ``host`` among ``workers`` slots, all alive."""
    return IPHashBalancer().slot_for_key(address_key(host), tuple(range(workers)))


def pid_alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie has exited: it only waits to be reaped)."""
    stat = Path(f"/proc/{pid}/stat")
    if stat.parent.parent.exists() and Path("/proc/self").exists():
        try:
            state = stat.read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return False
        return state != "Z"
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.02) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(interval)
    return condition()


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


def stop_process(process: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    """SIGTERM a process this test started, SIGKILL it if it has not exited within ``timeout``."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def request(
    address: tuple[str, int], source: str | None = None, line: str = "hello", timeout: float = 15.0
) -> dict[str, Any]:
    """One connection to a line-app server: send a line, return the worker's JSON reply."""
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        if source is not None:
            sock.bind((source, 0))
        sock.connect(address)
        sock.sendall(line.encode() + b"\n")
        return read_reply(sock)


def read_reply(sock: socket.socket) -> dict[str, Any]:
    """The worker's JSON reply line on ``sock``."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            raise ConnectionError(f"connection closed after {data!r}")
        data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


class ServerProcess:
    """One master process started from a test, its output, and the pids of every process it made."""

    def __init__(
        self,
        command: Sequence[str],
        *,
        pid_dir: Path,
        env: dict[str, str] | None = None,
        cwd: Path = REPO,
        marker: str = "",
        preexec_fn: Callable[[], None] | None = None,
        pass_fds: Sequence[int] = (),
    ) -> None:
        self.pid_dir = pid_dir
        self.marker = marker or str(command[-1])
        full_env = dict(os.environ)
        full_env.update({"APP_PID_DIR": str(pid_dir), "PYTHONUNBUFFERED": "1"})
        full_env.update(env or {})
        self.lines: list[str] = []
        self.output_closed = False
        self._changed = threading.Condition()
        self.process = subprocess.Popen(
            list(command),
            cwd=cwd,
            env=full_env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            preexec_fn=preexec_fn,
            pass_fds=pass_fds,
        )
        self.known_pids: set[int] = {self.process.pid}
        threading.Thread(target=self._collect, daemon=True).start()

    def _collect(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            with self._changed:
                self.lines.append(raw.decode(errors="replace").rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self.output_closed = True
            self._changed.notify_all()

    @property
    def output(self) -> str:
        with self._changed:
            return "\n".join(self.lines)

    def wait_for(self, pattern: str, timeout: float = 30.0, start: int = 0) -> re.Match[str]:
        """The first output line (from index ``start``) matching ``pattern``; fails after ``timeout``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[start:]:
                    match = regex.search(line)
                    if match:
                        return match
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self.output_closed:
                    why = "before the output closed" if self.output_closed else f"in {timeout} s"
                    raise AssertionError(f"no output line matched {pattern!r} {why}:\n{self.output_tail()}")
                self._changed.wait(remaining)

    def count(self, pattern: str) -> int:
        regex = re.compile(pattern)
        with self._changed:
            return sum(1 for line in self.lines if regex.search(line))

    def output_tail(self, lines: int = 40) -> str:
        return "\n".join(self.lines[-lines:])

    def wait_listening(self, timeout: float = 30.0) -> tuple[str, int]:
        match = self.wait_for(r"^LISTENING (\S+) (\d+)$", timeout)
        return match.group(1), int(match.group(2))

    def recorded_pids(self, role: str = "") -> list[int]:
        pids = []
        for entry in self.pid_dir.iterdir():
            name, _, pid = entry.name.rpartition("-")
            if name.startswith(role):
                pids.append(int(pid))
        self.known_pids.update(pids)
        return pids

    def worker_pids(self) -> list[int]:
        """Live worker processes now (children of the master)."""
        pids = children_of(self.process.pid)
        self.known_pids.update(pids)
        return pids

    def send_signal(self, signum: int) -> None:
        self.worker_pids()
        self.process.send_signal(signum)

    def wait_exit(self, timeout: float = 30.0) -> int:
        return self.process.wait(timeout)

    def stop(self, timeout: float = 30.0) -> int:
        if self.process.poll() is None:
            self.send_signal(signal.SIGTERM)
        return self.wait_exit(timeout)

    def leftovers(self) -> list[int]:
        """Known pids still running after a bounded wait."""
        if self.pid_dir.exists():
            self.recorded_pids()
        wait_until(lambda: not any(pid_alive(pid) for pid in self.known_pids), timeout=5.0)
        return sorted(pid for pid in self.known_pids if pid_alive(pid))

    def kill_leftovers(self, pids: list[int]) -> None:
        """SIGKILL pids this test started (checked by command line, never by name alone)."""
        for pid in pids:
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if self.marker in cmdline:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)


# --- what a proxy sends, by hand ------------------------------------------------------------------

SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"


def proxy_v1(source: str, port: int = 40000) -> bytes:
    family = "TCP6" if ":" in source else "TCP4"
    destination = "::1" if ":" in source else "127.0.0.1"
    return f"PROXY {family} {source} {destination} {port} 80\r\n".encode()


def proxy_v2(source: str, port: int = 40000) -> bytes:
    if ":" in source:
        addresses = socket.inet_pton(socket.AF_INET6, source) + socket.inet_pton(socket.AF_INET6, "::1")
        family = 0x21
    else:
        addresses = socket.inet_aton(source) + socket.inet_aton("127.0.0.1")
        family = 0x11
    block = addresses + struct.pack(">HH", port, 80)
    return SIGNATURE + bytes([0x21, family]) + struct.pack(">H", len(block)) + block


def exchange(address: tuple[str, int], data: bytes, source: str = "127.0.0.1", timeout: float = 15.0) -> bytes:
    """Send ``data`` on a new connection and return everything the server sends until it closes."""
    with socket.create_connection(address, timeout=timeout, source_address=(source, 0)) as sock:
        sock.sendall(data)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def reply_of(data: bytes) -> dict[str, Any]:
    body = data.split(b"\r\n\r\n", 1)[1] if data.startswith(b"HTTP/") else data
    result: dict[str, Any] = json.loads(body)
    return result


def line_app_command(module: bool = False, python: str = sys.executable) -> list[str]:
    if module:
        return [python, "-m", "apps.line_app"]
    return [python, str(LINE_APP)]


class LoadGenerator:
    """Client threads making new connections from distinct addresses until stopped.

    Every failure is classified: refused (never acceptable), died with its worker
    (reset or closed while a disruption recorded by ``disrupted()`` happened during
    the connection's life), or unexplained (a lost connection).
    """

    def __init__(self, address: tuple[str, int], clients: int = 6, ips: Sequence[str] = CLIENT_IPS) -> None:
        self.address = address
        self.ips = list(ips)
        self.stopping = threading.Event()
        self.served: list[dict[str, Any]] = []
        self.refused: list[str] = []
        self.died_with_worker: list[str] = []
        self.unexplained: list[str] = []
        self.disruptions: list[float] = []
        self._threads = [threading.Thread(target=self._client, args=(n,), daemon=True) for n in range(clients)]

    def __enter__(self) -> LoadGenerator:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stopping.set()
        for thread in self._threads:
            thread.join(30)
        assert not any(thread.is_alive() for thread in self._threads), "a client thread hung"

    def disrupted(self) -> None:
        """Record that a worker is being killed or replaced now."""
        self.disruptions.append(time.monotonic())

    def _client(self, n: int) -> None:
        ip = self.ips[n % len(self.ips)]
        while not self.stopping.is_set():
            began = time.monotonic()
            try:
                reply = request(self.address, source=ip, line=f"c{n}")
            except ConnectionRefusedError as exc:
                self.refused.append(f"{ip}: {exc!r}")
                continue
            except OSError as exc:
                ended = time.monotonic()
                overlapping = any(began <= moment <= ended for moment in self.disruptions)
                (self.died_with_worker if overlapping else self.unexplained).append(f"{ip}: {exc!r}")
                continue
            assert reply["line"] == f"c{n}", reply
            self.served.append(reply)

    def report(self) -> str:
        return (
            f"served {len(self.served)}, died with their worker {len(self.died_with_worker)}, "
            f"refused {len(self.refused)}, unexplained {len(self.unexplained)}"
        )

    def assert_nothing_lost(self, minimum_served: int = 100) -> None:
        print(self.report())
        assert len(self.served) >= minimum_served, self.report()
        assert not self.refused, self.refused[:10]
        assert not self.unexplained, self.unexplained[:10]


def run_node(node_dir: Path, script: str, *arguments: str, timeout: float = 120.0) -> Any:
    """Run one of ``tests/node``'s client scripts; the JSON object it prints (one that says ``fatal`` fails)."""
    done = subprocess.run(
        ["node", str(node_dir / script), *arguments], capture_output=True, text=True, timeout=timeout, check=True
    )
    results = json.loads(done.stdout)
    assert "fatal" not in results, results
    return results
