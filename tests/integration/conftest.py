from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from .harness import (
    HAPROXY,
    HAPROXY_CONFIG,
    HERE,
    LINE_APP,
    NODE_DIR,
    ServerProcess,
    free_port,
    line_app_command,
    pid_alive,
    stop_process,
    wait_until,
)

if not sys.platform.startswith("linux"):
    pytest.skip("integration tests use 127.0.0.x source addresses and /proc (Linux)", allow_module_level=True)

StartApp = Callable[..., ServerProcess]
HERE_DIR = Path(__file__).resolve().parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test in this folder is an integration test: ``pytest -m "not integration"`` leaves them out."""
    for item in items:
        if HERE_DIR in item.path.parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture
def start_app(tmp_path: Path) -> Iterator[StartApp]:
    """Start line-app servers; afterwards stop them and fail if any of their processes is left."""
    started: list[ServerProcess] = []

    def start(
        env: dict[str, str] | None = None,
        module: bool = False,
        python: str = sys.executable,
        pid_dir: Path | None = None,
        script: Path = LINE_APP,
        command: list[str] | None = None,
        **kwargs: Any,
    ) -> ServerProcess:
        if pid_dir is None:
            pid_dir = tmp_path / f"pids{len(started)}"
            pid_dir.mkdir()
        cwd = HERE if module else kwargs.pop("cwd", HERE.parent.parent)
        if command is None:
            command = line_app_command(module, python) if script == LINE_APP else [python, str(script)]
        marker = kwargs.pop("marker", script.stem)
        server = ServerProcess(command, pid_dir=pid_dir, env=env, cwd=cwd, marker=marker, **kwargs)
        started.append(server)
        return server

    yield start

    problems = []
    for server in started:
        if server.process.poll() is None:
            try:
                server.stop(timeout=30)
            except Exception as exc:  # the test already failed or hung the server: clean up anyway
                problems.append(f"master {server.process.pid} did not stop: {exc}")
                server.process.kill()
                server.process.wait(10)
        left = server.leftovers()
        if left:
            server.kill_leftovers(left)
            problems.append(f"processes left behind: {left}\n{server.output_tail()}")
    assert not problems, "\n".join(problems)


@pytest.fixture(scope="session")
def node_clients() -> Path:
    """tests/node with its npm packages installed (npm ci on first use): socket.io-client, playwright-core."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CI"):
            pytest.fail("node and npm are needed for the socket.io-client tests; .ci/run installs them")
        pytest.skip("node and npm are not installed (apt-get install nodejs npm)")
    if not (NODE_DIR / "node_modules" / "socket.io-client").is_dir():
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, check=True, timeout=300, stdout=subprocess.DEVNULL
        )
    return NODE_DIR


HaproxyStarter = Callable[[int, int], dict[str, tuple[str, int]]]


@pytest.fixture
def start_haproxy(tmp_path: Path) -> Iterator[HaproxyStarter]:
    """Run HAProxy (-db: foreground) in front of the given ports; stop it by pid afterwards.

    ``start(tcp_port, http_backend_port)`` returns the frontends (see ``HAPROXY_CONFIG``).
    """
    if HAPROXY is None:
        if os.environ.get("CI"):
            pytest.fail("haproxy is not installed; .ci/run installs it (apt-get install haproxy)")
        pytest.skip("haproxy is not installed (apt-get install haproxy)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(tcp_port: int, http_backend_port: int) -> dict[str, tuple[str, int]]:
        ports = {"v1_port": free_port(), "v2_port": free_port(), "http_port": free_port(), "reuse_port": free_port()}
        config = tmp_path / f"haproxy{len(processes)}.cfg"
        config.write_text(HAPROXY_CONFIG.format(tcp_port=tcp_port, http_backend_port=http_backend_port, **ports))
        assert HAPROXY is not None
        process = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)

        def listening() -> bool:
            for port in ports.values():
                try:
                    socket.create_connection(("127.0.0.1", port), timeout=1).close()
                except OSError:
                    return False
            return True

        if not wait_until(listening, timeout=15):
            process.kill()
            output = process.communicate(timeout=10)[0].decode(errors="replace")
            raise AssertionError(f"haproxy did not start:\n{output}")
        return {name: ("127.0.0.1", port) for name, port in ports.items()}

    yield start

    for process in processes:
        stop_process(process)
        assert not pid_alive(process.pid)


@pytest.fixture(params=["master", "kernel"])
def steering(request: pytest.FixtureRequest) -> str:
    """Both routing paths, for the tests of what each must hold alike (APP_STEERING for the line app)."""
    if request.param == "kernel" and not sys.platform.startswith("linux"):
        pytest.skip("kernel steering is Linux's")
    return str(request.param)


NGINX = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)

NGINX_CONFIG = """
daemon off;
master_process on;
worker_processes 1;
{user}
pid {folder}/nginx.pid;
error_log stderr warn;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    client_body_temp_path {folder}/tmp/body;
    proxy_temp_path {folder}/tmp/proxy;
    fastcgi_temp_path {folder}/tmp/fastcgi;
    uwsgi_temp_path {folder}/tmp/uwsgi;
    scgi_temp_path {folder}/tmp/scgi;
    map $http_upgrade $connection_upgrade {{
        default upgrade;
        '' {no_upgrade};
    }}
    upstream app {{
        server {upstream};
        {keepalive}
    }}
    server {{
        listen 127.0.0.1:{port};
        location / {{
            proxy_pass http://app;
            proxy_http_version 1.1;
            proxy_set_header Upgrade $http_upgrade;
            proxy_set_header Connection $connection_upgrade;
            proxy_set_header Host $host;
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
        }}
    }}
}}
"""

NginxStarter = Callable[..., int]


@pytest.fixture
def shared_folder() -> Iterator[Path]:
    """A folder nginx's www-data workers can reach (pytest's tmp_path is root's alone)."""
    folder = Path(tempfile.mkdtemp(prefix="sticky-nginx-"))
    folder.chmod(0o755)
    (folder / "tmp").mkdir(mode=0o777)
    (folder / "tmp").chmod(0o777)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.fixture
def start_nginx(shared_folder: Path) -> Iterator[NginxStarter]:
    """``start(upstream, keepalive=False)`` runs nginx in front of ``upstream`` (``unix:/path`` or ``HOST:PORT``);
    its port. ``keepalive``: nginx keeps idle connections to the upstream open and mixes clients on them."""
    if NGINX is None:
        if os.environ.get("CI"):
            pytest.fail("nginx is not installed; .ci/run installs it (apt-get install nginx-light)")
        pytest.skip("nginx is not installed (apt-get install nginx-light)")
    processes: list[subprocess.Popen[bytes]] = []

    def start(upstream: str, keepalive: bool = False) -> int:
        port = free_port()
        config = shared_folder / f"nginx{len(processes)}.conf"
        user = "user www-data;" if os.geteuid() == 0 else ""
        pooled = (
            {"keepalive": "keepalive 16;", "no_upgrade": '""'}
            if keepalive
            else {"keepalive": "", "no_upgrade": "close"}
        )
        config.write_text(NGINX_CONFIG.format(user=user, folder=shared_folder, upstream=upstream, port=port, **pooled))
        assert NGINX is not None
        process = subprocess.Popen(
            [NGINX, "-c", str(config), "-p", str(shared_folder)],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        processes.append(process)

        def listening() -> bool:
            assert process.poll() is None, process.communicate(timeout=5)[0].decode(errors="replace")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return True
            except OSError:
                return False

        assert wait_until(listening, 15), "nginx did not listen"
        return port

    yield start
    for process in processes:
        if process.poll() is None:
            process.send_signal(signal.SIGQUIT)  # nginx's graceful stop: it ends its workers itself
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)
    for pid_file in shared_folder.glob("*.pid"):
        assert not pid_alive(int(pid_file.read_text() or 0)), "nginx left behind"
