"""nginx in front, as python-socketio documents it, with the command's defaults: over TCP and over a Unix socket.

Twenty Node socket.io clients (socket.io-client from npm) from twenty 127.x addresses
connect through a real nginx (running its workers as www-data when the tests run as
root) to ``sticky-server`` with 4 workers: all connect, upgrade to websocket, see
their own address and hear every broadcast exactly once, spread over the workers.

- On a Unix socket nothing needs saying: the socket is ``rw-rw-rw-`` and the command
  routes by X-Forwarded-For there by default. Control: ``--no-proxy-headers`` spreads
  the clients in turn and breaks their polling handshakes.
- Over TCP, ``--proxy-headers``. Control: without it every client lands on one worker,
  and that worker says so once, naming the flag.
"""

from __future__ import annotations

import stat
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from .conftest import NGINX_CONFIG, NginxStarter, StartApp
from .harness import HERE, ServerProcess, free_port
from .test_node_clients import CLIENTS, SHOUTS, fully_working, run_clients

LISTENING = r"listening on (\S+) with (\d+) workers"
SERVERS = {
    "asgi": ("apps.socketio_asgi:app", "--asgi"),
    "flask-socketio": ("apps.flask_socketio_app:app", "--wsgi"),
}


def serve(start_app: StartApp, server: str, bind: list[str], *flags: str) -> ServerProcess:
    target, kind = SERVERS[server]
    command = [sys.executable, "-m", "sticky_server", target, kind, "-w", "4", *bind, "--graceful-timeout", "2"]
    app = start_app(command=[*command, *flags], cwd=HERE)
    app.wait_for(LISTENING, 60)
    return app


def assert_all_work_across_workers(results: dict[str, Any], transports: str) -> None:
    errors = {ip: result["error"] for ip, result in results.items() if result["error"]}
    assert not errors, errors
    broken = {ip: result for ip, result in results.items() if ip not in fully_working(results, transports)}
    assert not broken, broken  # connected, upgraded, saw its own address, heard every shout once
    workers = {result["worker"] for result in results.values()}
    assert len(workers) >= 3, f"20 clients on {workers}: not spread"


@pytest.mark.parametrize("server", list(SERVERS))
def test_nginx_on_a_unix_socket_works_with_the_defaults(
    start_app: StartApp, start_nginx: NginxStarter, node_clients: Path, shared_folder: Path, server: str
) -> None:
    path = shared_folder / "app.sock"
    serve(start_app, server, ["--uds", str(path)])
    assert stat.S_IMODE(path.stat().st_mode) == 0o666
    port = start_nginx(f"unix:{path}")
    results = run_clients(node_clients, port, "polling,websocket")
    assert_all_work_across_workers(results, "polling,websocket")


def test_control_a_unix_socket_without_proxy_headers_breaks_the_handshakes(
    start_app: StartApp, start_nginx: NginxStarter, node_clients: Path, shared_folder: Path
) -> None:
    path = shared_folder / "app.sock"
    app = serve(start_app, "asgi", ["--uds", str(path)], "--no-proxy-headers")
    assert "clients of unix:" in app.output and "have no address" in app.output
    port = start_nginx(f"unix:{path}")
    results = run_clients(node_clients, port, "polling")
    working = fully_working(results, "polling")
    assert len(working) < len(CLIENTS) // 2, f"{len(working)} of 20 clients worked without the header"


@pytest.mark.parametrize("server", list(SERVERS))
def test_nginx_over_tcp_with_proxy_headers(
    start_app: StartApp, start_nginx: NginxStarter, node_clients: Path, server: str
) -> None:
    backend = free_port()
    serve(start_app, server, ["-b", f"127.0.0.1:{backend}"], "--proxy-headers")
    port = start_nginx(f"127.0.0.1:{backend}")
    results = run_clients(node_clients, port, "polling,websocket")
    assert_all_work_across_workers(results, "polling,websocket")


def test_control_nginx_over_tcp_without_proxy_headers_lands_on_one_worker_and_says_so(
    start_app: StartApp, start_nginx: NginxStarter, node_clients: Path
) -> None:
    backend = free_port()
    app = serve(start_app, "asgi", ["-b", f"127.0.0.1:{backend}"])
    port = start_nginx(f"127.0.0.1:{backend}")
    results = run_clients(node_clients, port, "polling,websocket")
    assert {result["worker"] for result in results.values()} == {results[CLIENTS[0]]["worker"]}
    assert len(fully_working(results, "polling,websocket")) == len(CLIENTS)  # working, all on one worker
    warning = app.wait_for(r"WARNING worker \d+: requests from the proxy at 127\.0\.0\.1 name different clients", 10)
    assert "--proxy-headers" in warning.string
    time.sleep(0.2)
    assert app.output.count("name different clients") == 1, "said once"
    assert sorted(SHOUTS) == sorted(results[CLIENTS[0]]["heard"])


def test_the_readme_shows_the_nginx_settings_these_tests_run() -> None:
    """Every directive of the README's nginx example for sticky-server is in the configuration tested here."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    block = readme.split("```nginx\n", 1)[1].split("```", 1)[0]
    for line in block.splitlines():
        directive = line.split("#", 1)[0].strip()
        if directive.startswith(("proxy_", "map ")):
            assert directive.rstrip(";").split()[0] in NGINX_CONFIG, directive
            if directive.startswith("proxy_set_header"):
                assert directive in NGINX_CONFIG, directive
    assert "--uds /run/app/app.sock" in block and "--proxy-headers" in block
