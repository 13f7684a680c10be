"""The sticky-server command, run for real: binds, apps, environment variables, status, errors."""

from __future__ import annotations

import contextlib
import functools
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from sticky_server.balancer import IPHashBalancer, address_key

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, ServerProcess, children_of, free_port, wait_until

TIMEOUT = 15.0
CLI = [sys.executable, "-m", "sticky_server"]
# The master says where it listens once every worker is ready.
LISTENING = r"listening on (.+) with (\d+) workers \(master pid (\d+)\)"


def clean_env(**extra: str) -> dict[str, str]:
    env = {key: value for key, value in os.environ.items() if not key.startswith("STICKY_SERVER_")}
    env.update(extra)
    return env


def line_request(connect: Any) -> dict[str, Any]:
    with connect() as sock:
        sock.settimeout(TIMEOUT)
        sock.sendall(b"hi\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(4096)
            assert chunk, f"closed after {data!r}"
            data += chunk
    reply: dict[str, Any] = json.loads(data)
    return reply


def tcp_from(address: tuple[str, int], ip: str) -> Any:
    return lambda: socket.create_connection(address, timeout=TIMEOUT, source_address=(ip, 0))


def unix_at(path: Path) -> Any:
    def connect() -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(TIMEOUT)
        sock.connect(str(path))
        return sock

    return connect


def start_cli(start_app: StartApp, args: list[str], env: dict[str, str] | None = None) -> ServerProcess:
    server = start_app(command=[*CLI, *args], env=clean_env(**(env or {})), cwd=HERE)
    server.wait_for(LISTENING, TIMEOUT * 2)
    return server


def test_worker_factory_on_tcp_and_unix_binds_with_status_and_pid_file(start_app: StartApp, tmp_path: Path) -> None:
    port, metrics_port = free_port(), free_port()
    unix_path, pid_file = tmp_path / "app.sock", tmp_path / "app.pid"
    server = start_cli(
        start_app,
        [
            "apps.cli_apps:LineWorker",
            "--bind",
            f"127.0.0.1:{port}",
            "--bind",
            f"unix:{unix_path}",
            "--pid",
            str(pid_file),
            "--metrics",
            f"127.0.0.1:{metrics_port}",
        ],
        env={"STICKY_SERVER_WORKERS": "3"},  # from the environment
    )
    assert pid_file.read_text().strip() == str(server.process.pid)
    assert server.wait_for(LISTENING).group(2) == "3"
    hasher = IPHashBalancer()
    for ip in CLIENT_IPS[:9]:
        replies = [line_request(tcp_from(("127.0.0.1", port), ip)) for _ in range(2)]
        expected = hasher.slot_for_key(address_key(ip), (0, 1, 2))
        assert [reply["slot"] for reply in replies] == [expected, expected], ip
    unix_slots = [line_request(unix_at(unix_path))["slot"] for _ in range(6)]
    assert sorted(set(unix_slots)) == [0, 1, 2]  # no address to stick to: spread in turn

    def status() -> dict[str, Any]:
        result = subprocess.run(
            [*CLI, "status", "--pid", str(pid_file)], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
        )
        assert result.returncode == 0, result.stderr
        figures: dict[str, Any] = json.loads(result.stdout)
        return figures

    stats = status()
    assert stats["pid"] == server.process.pid
    assert stats["handed_off"] == 9 * 2 + 6 and stats["accepted"] == 9 * 2 + 6
    assert [worker["slot"] for worker in stats["workers"]] == [0, 1, 2]
    assert sorted(worker["pid"] for worker in stats["workers"]) == sorted(server.worker_pids())
    assert all(worker["restarts"] == 0 and worker["ready"] for worker in stats["workers"])
    assert server.wait_for(
        r"stats: 3 workers, 24 connections accepted, 24 handed off", TIMEOUT
    )  # SIGUSR1 also logged them

    scrape = http.client.HTTPConnection("127.0.0.1", metrics_port, timeout=TIMEOUT)
    scrape.request("GET", "/metrics")
    response = scrape.getresponse()
    text = response.read().decode()
    scrape.close()
    assert response.status == 200 and response.getheader("Content-Type", "").startswith("text/plain; version=0.0.4")
    samples = dict(line.rsplit(" ", 1) for line in text.splitlines() if line and not line.startswith("#"))
    assert samples["sticky_server_workers"] == "3"
    assert samples["sticky_server_connections_accepted_total"] == "24"
    assert sum(int(samples[f'sticky_server_connections_handed_off_total{{slot="{n}"}}']) for n in range(3)) == 24
    assert [samples[f'sticky_server_worker_up{{slot="{n}"}}'] for n in range(3)] == ["1", "1", "1"]

    victim = stats["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    assert wait_until(lambda: victim not in server.worker_pids() and len(server.worker_pids()) == 3, TIMEOUT)
    line_request(unix_at(unix_path))  # served: the new worker is in
    server.send_signal(signal.SIGUSR1)
    assert server.wait_for(r"stats: 3 workers, \d+ connections accepted, \d+ handed off, \d+ live, 1 restarts", TIMEOUT)

    assert server.stop(TIMEOUT + 10) == 0
    assert not pid_file.exists() and not unix_path.exists()  # both cleaned up


def test_proxy_protocol_on_a_unix_socket_routes_by_the_address_in_the_header(
    start_app: StartApp, tmp_path: Path
) -> None:
    """As nginx or HAProxy on the same machine would send it: a Unix-socket peer is trusted like loopback."""
    unix_path = tmp_path / "proxied.sock"
    start_cli(start_app, ["apps.cli_apps:LineWorker", "-w", "3", "-b", f"unix:{unix_path}", "--proxy-protocol"])
    hasher = IPHashBalancer()
    connect = unix_at(unix_path)

    def proxied(client: str, port: int) -> socket.socket:
        sock: socket.socket = connect()
        sock.sendall(f"PROXY TCP4 {client} 192.0.2.1 {port} 443\r\n".encode())
        return sock

    for n in range(9):
        client = f"198.51.100.{n + 1}"
        replies = [line_request(functools.partial(proxied, client, 40000 + n)) for _ in range(2)]
        expected = hasher.slot_for_key(address_key(client), (0, 1, 2))
        assert [reply["slot"] for reply in replies] == [expected, expected], client
        assert replies[0]["peer"] == [client, 40000 + n]


@pytest.mark.parametrize("steering", ["", "master", "kernel"], ids=["default", "master", "kernel"])
def test_asgi_app_with_one_command(start_app: StartApp, steering: str) -> None:
    if steering == "kernel" and not sys.platform.startswith("linux"):
        pytest.skip("kernel steering is Linux's")
    chosen = ["--steering", steering] if steering else []
    server = start_cli(start_app, ["apps.cli_apps:app", "--asgi", "-w", "2", "-b", "127.0.0.1:0", *chosen])
    host_port = server.wait_for(LISTENING).group(1)
    expected_path = steering or ("kernel" if sys.platform.startswith("linux") else "master")
    server.wait_for(rf"\(master pid \d+\) on the {expected_path} path")
    port = int(host_port.rsplit(":", 1)[1])
    for ip in CLIENT_IPS[:4]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT, source_address=(ip, 0))
        try:
            conn.request("GET", "/")
            reply = json.loads(conn.getresponse().read())
        finally:
            conn.close()
        assert reply["client"] == ip and reply["started"]
        assert reply["loop"] == "uvloop"  # installed with the test extra: the fast stack without a flag
    assert server.stop(TIMEOUT + 10) == 0


@pytest.mark.parametrize("loop", ["auto", "uvloop"])
def test_on_a_dual_stack_bind_an_ipv4_client_is_its_ipv4_address_unless_uvloop_is_insisted_on(
    start_app: StartApp, loop: str
) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6")
    port = free_port()
    # ":PORT" is every interface: one IPv6 socket taking IPv4 clients too.
    server = start_cli(start_app, ["apps.cli_apps:app", "--asgi", "-w", "2", "-b", f":{port}", "--loop", loop])
    server.wait_for(LISTENING)
    replies = []
    for ip in CLIENT_IPS[:2]:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=TIMEOUT, source_address=(ip, 0))
        try:
            conn.request("GET", "/")
            replies.append(json.loads(conn.getresponse().read()))
        finally:
            conn.close()
    if loop == "auto":
        # uvloop reads the peer from the descriptor: "auto" keeps asyncio's loop, and the app sees the IPv4 client.
        assert [(reply["loop"], reply["client"]) for reply in replies] == [("asyncio", ip) for ip in CLIENT_IPS[:2]]
        server.wait_for(r"the workers run on asyncio's loop, not uvloop: a listener takes IPv4 clients on IPv6")
    else:  # the control: what uvloop shows on that socket
        assert [(reply["loop"], reply["client"]) for reply in replies] == [
            ("uvloop", f"::ffff:{ip}") for ip in CLIENT_IPS[:2]
        ]
    assert server.stop(TIMEOUT + 10) == 0


def run_cli(args: list[str], **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*CLI, *args], capture_output=True, text=True, timeout=TIMEOUT * 2, cwd=HERE, env=clean_env(**env)
    )


def test_bad_arguments_are_a_usage_error_and_start_nothing() -> None:
    cases = [
        (["apps.cli_apps:LineWorker", "--workers", "0"], "argument -w/--workers: invalid positive whole number"),
        (["apps.cli_apps:LineWorker", "--bind", "localhost"], "bind 'localhost' has no port"),
        (["apps.cli_apps:LineWorker", "--balancer", "fastest"], "--balancer must be one of ip-hash"),
        (["apps.cli_apps:LineWorker", "--asgi", "--wsgi"], "not allowed with argument"),
        (["apps.cli_apps"], "TARGET must be module:name"),
        (["apps.cli_apps:missing", "--preload"], "module 'apps.cli_apps' has no 'missing'"),
        (["apps.cli_apps:STATE", "--preload"], "TARGET is a dict, not an app, a worker or a factory"),
        (["apps.cli_apps:LineWorker", "--forwarded-header", "bad header"], "--forwarded-header must be an HTTP header"),
        (
            ["apps.cli_apps:LineWorker", "--steering", "kernel", "--balancer", "round-robin", "-b", "127.0.0.1:0"],
            "--steering kernel is not possible here: the balancer is RoundRobinBalancer",
        ),
        (["-k", "uvicorn.workers.UvicornWorker", "apps.cli_apps:app"], "-k does not apply to sticky-server"),
    ]
    for args, message in cases:
        result = run_cli(args)
        assert result.returncode == 2, (args, result.stderr)
        assert result.stderr.startswith("usage: sticky-server"), result.stderr
        assert len(result.stderr.strip().splitlines()) == 2, result.stderr  # a short usage and the error
        assert message in result.stderr.strip().splitlines()[-1], (args, result.stderr)
        assert "listening on" not in result.stderr and "started (pid" not in result.stderr
    bad_env = run_cli(["apps.cli_apps:LineWorker"], STICKY_SERVER_GRACEFUL_TIMEOUT="soon")
    assert bad_env.returncode == 2
    assert "environment variable STICKY_SERVER_GRACEFUL_TIMEOUT='soon' is not a valid --graceful-timeout" in (
        bad_env.stderr
    )


def test_a_target_the_workers_cannot_use_fails_the_start_with_one_line() -> None:
    """Without --preload the master never imports TARGET: the workers find the mistake, before 'listening'."""
    for target, message in [
        ("apps.cli_apps:missing", "sticky-server: module 'apps.cli_apps' has no 'missing'"),
        ("apps.cli_apps:STATE", "sticky-server: TARGET is a dict, not an app, a worker or a factory"),
    ]:
        result = run_cli([target, "-w", "3", "-b", "127.0.0.1:0"])
        assert result.returncode == 1, result.stderr
        assert result.stderr.count(message) == 1, result.stderr  # once, not once per worker
        assert "listening on" not in result.stderr
        assert result.stderr.strip().splitlines()[-1].startswith("sticky-server: worker"), result.stderr
        assert "Traceback" not in result.stderr


def test_an_import_error_shows_the_users_traceback_before_the_server_is_up() -> None:
    result = run_cli(["apps.cli_broken:app", "-w", "2", "-b", "127.0.0.1:0"])
    assert result.returncode == 1
    stderr = result.stderr
    assert "listening on" not in stderr
    assert stderr.count("Traceback") == 1  # the first worker to fail; the others say nothing
    assert "sticky-server: importing apps.cli_broken:app failed:" in stderr
    assert 'apps/cli_broken.py", line 3, in <module>' in stderr  # the user's frame
    assert stderr.count("RuntimeError: boom in the user's module") == 1
    assert "before it was ready, so the server did not start" in stderr.strip().splitlines()[-1]


def test_with_preload_an_import_error_shows_the_users_traceback_and_starts_no_worker() -> None:
    process = subprocess.Popen(
        [*CLI, "apps.cli_broken:app", "--preload", "-w", "2", "-b", "127.0.0.1:0"],
        cwd=HERE,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    spawned: set[int] = set()
    deadline = time.monotonic() + TIMEOUT
    while process.poll() is None and time.monotonic() < deadline:
        spawned.update(children_of(process.pid))
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(0.01)
    if process.poll() is None:
        process.kill()
    _, stderr = process.communicate(timeout=TIMEOUT)
    assert process.returncode == 1
    assert not spawned, f"workers were started: {spawned}"
    lines = stderr.strip().splitlines()
    assert lines[0] == "sticky-server: importing apps.cli_broken:app failed:"
    assert 'apps/cli_broken.py", line 3, in <module>' in stderr  # the user's frame
    assert "sticky_server" not in "\n".join(lines[1:]).replace("apps/cli_broken", "")  # none of ours
    assert lines[-1] == "RuntimeError: boom in the user's module"


def test_a_stale_pid_file_naming_another_process_is_never_signalled_nor_blocks_a_start(
    start_app: StartApp, tmp_path: Path
) -> None:
    """After a crash the pid file may name anything: only a master holding the file's lock is believed."""
    pid_file = tmp_path / "app.pid"
    bystander = subprocess.Popen(["sleep", "60"])  # SIGUSR1 would end it
    try:
        pid_file.write_text(f"{bystander.pid}\n")
        result = subprocess.run(
            [*CLI, "status", "--pid", str(pid_file)], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
        )
        assert result.returncode == 1
        assert f"names pid {bystander.pid}, but no sticky-server master holds it" in result.stderr
        time.sleep(0.2)
        assert bystander.poll() is None, "the bystander was signalled"
        server = start_cli(
            start_app, ["apps.cli_apps:LineWorker", "-w", "1", "-b", "127.0.0.1:0", "--pid", str(pid_file)]
        )
        assert pid_file.read_text().strip() == str(server.process.pid)
        second = run_cli(["apps.cli_apps:LineWorker", "-w", "1", "-b", "127.0.0.1:0", "--pid", str(pid_file)])
        assert second.returncode == 2 and "is already running with this pid file" in second.stderr
        status = subprocess.run(
            [*CLI, "status", "--pid", str(pid_file)], capture_output=True, text=True, timeout=TIMEOUT, env=clean_env()
        )
        assert status.returncode == 0 and json.loads(status.stdout)["pid"] == server.process.pid
    finally:
        bystander.kill()
        bystander.wait(5)
