"""Sticky by session (``--route-by engineio``), with Node's own socket.io client from npm, through the command.

- 100 clients behind ONE address, sharing one keep-alive agent (pooled connections, as
  behind a NAT or a browser), on 4 workers: they spread with the busiest worker at most
  1.25 times the average, all upgrade to websocket and hear every broadcast exactly
  once. Control: IP hash puts all 100 on one worker.
- Clients whose address changes mid-session (the handshake from one address, the next
  request from another, the rest and the websocket from a third) keep their session.
  Control: with IP hash they lose it.
"""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.sessions import key_hash, rendezvous_order

from .conftest import HaproxyStarter, NginxStarter, StartApp
from .harness import CLIENT_IPS, HERE, free_port, run_node
from .websocket_client import BlockingWebSocket

SHOUTS = ["first", "second", "third"]
CLI_LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
NODE_TIMEOUT = 120
SERVERS = {
    "asgi-cli": ("apps.socketio_asgi:app", "--asgi"),
    "flask-socketio-cli": ("apps.flask_socketio_app:app", "--wsgi"),
}


def serve(start_app: StartApp, server: str, route_by: str, steering: str = "auto") -> int:
    target, kind = SERVERS[server]
    command = [sys.executable, "-m", "sticky_server", target, kind, "-w", "4", "-b", "127.0.0.1:0"]
    command += ["--route-by", route_by, "--graceful-timeout", "2", "--steering", steering]
    app = start_app(command=command, cwd=HERE)
    return int(app.wait_for(CLI_LISTENING, 60).group(1))


def run_clients(node_dir: Path, port: int, transports: str, ip: str, count: int, sources: str = "") -> Any:
    arguments = [f"http://127.0.0.1:{port}", transports, ip, str(count), *([sources] if sources else [])]
    return run_node(node_dir, "one_address_clients.js", *arguments, timeout=NODE_TIMEOUT)


def addresses_on_different_workers(count: int) -> list[str]:
    """``count`` client addresses that IP hash puts on ``count`` different workers of 4."""
    everyone = WorkerSet(4, (0, 1, 2, 3))
    chosen: dict[int, str] = {}
    for ip in CLIENT_IPS:
        chosen.setdefault(IPHashBalancer().pick(ClientInfo(ip, 0), everyone), ip)
    assert len(chosen) >= count
    return list(chosen.values())[:count]


def working(results: dict[str, Any], transport: str) -> set[str]:
    return {
        name
        for name, result in results.items()
        if result["error"] is None and result["transport"] == transport and sorted(result["heard"]) == sorted(SHOUTS)
    }


@pytest.mark.parametrize(
    ("server", "steering"), [("asgi-cli", "master"), ("flask-socketio-cli", "master"), ("asgi-cli", "kernel")]
)
def test_a_hundred_clients_behind_one_address_spread_and_keep_their_sessions(
    start_app: StartApp, node_clients: Path, server: str, steering: str
) -> None:
    """The busiest worker holds at most 1.25 times the average of sessions. On the master path the master places
    every new session; on the kernel path each worker keeps new sessions while the allowance the master told it
    lasts (and says how many), and the master places the rest."""
    port = serve(start_app, server, "engineio", steering)
    results = run_clients(node_clients, port, "polling,websocket", CLIENT_IPS[0], 100)
    errors = {name: result["error"] for name, result in results.items() if result["error"]}
    assert not errors, errors
    assert working(results, "websocket") == set(results), "every client upgrades and hears every broadcast once"
    per_worker = Counter(result["worker"] for result in results.values())
    assert len(per_worker) == 4 and max(per_worker.values()) <= 1.25 * 25, per_worker
    assert all(result["sids"][0] == result["sids"][-1] for result in results.values())  # no new session


def test_control_ip_hash_puts_one_address_on_one_worker(start_app: StartApp, node_clients: Path) -> None:
    port = serve(start_app, "asgi-cli", "ip")
    results = run_clients(node_clients, port, "polling,websocket", CLIENT_IPS[0], 20)
    assert len({result["worker"] for result in results.values() if result["worker"] is not None}) == 1


@pytest.mark.parametrize(("route_by", "keeps"), [("engineio", True), ("ip", False)])
def test_a_client_whose_address_changes_mid_session_keeps_it(
    start_app: StartApp, node_clients: Path, route_by: str, keeps: bool
) -> None:
    port = serve(start_app, "asgi-cli", route_by)
    sources = ",".join(addresses_on_different_workers(3))  # the handshake, the next request, then the rest
    results = run_clients(node_clients, port, "polling,websocket", CLIENT_IPS[1], 8, sources)
    kept = {
        name
        for name, result in results.items()
        if name in working(results, "websocket") and result["sids"][0] == result["sids"][-1]
    }
    if keeps:
        assert kept == set(results), {name: result["error"] for name, result in results.items()}
    else:
        assert len(kept) < len(results), "IP hash kept every moving client: the control proves nothing"


# --- behind proxies that pool their connections to the backend and mix clients on them ------------------


def serve_behind(start_app: StartApp, server: str, bind: list[str], *flags: str) -> None:
    target, kind = SERVERS[server]
    command = [sys.executable, "-m", "sticky_server", target, kind, "-w", "4", *bind, "--route-by", "engineio"]
    app = start_app(command=[*command, "--graceful-timeout", "2", *flags], cwd=HERE)
    app.wait_for(r"listening on (\S+) with", 60)


def assert_fifty_work_and_see_their_own_address(results: dict[str, Any]) -> None:
    errors = {name: result["error"] for name, result in results.items() if result["error"]}
    assert not errors, errors
    assert working(results, "websocket") == set(results), "every client upgrades and hears every broadcast once"
    assert all(result["client"] == result["address"] for result in results.values())  # the proxy told it
    per_worker = Counter(result["worker"] for result in results.values())
    assert len(per_worker) == 4 and max(per_worker.values()) <= 1.25 * 50 / 4 + 1, per_worker


@pytest.mark.parametrize(("server", "over"), [("asgi-cli", "tcp"), ("asgi-cli", "unix"), ("flask-socketio-cli", "tcp")])
def test_behind_nginx_with_upstream_keepalive(
    start_app: StartApp, start_nginx: NginxStarter, node_clients: Path, shared_folder: Path, server: str, over: str
) -> None:
    if over == "unix":
        path = shared_folder / "app.sock"
        serve_behind(start_app, server, ["--uds", str(path)])  # X-Forwarded-For read there by default
        upstream = f"unix:{path}"
    else:
        backend = free_port()
        serve_behind(start_app, server, ["-b", f"127.0.0.1:{backend}"], "--proxy-headers")
        upstream = f"127.0.0.1:{backend}"
    port = start_nginx(upstream, keepalive=True)
    results = run_clients(node_clients, port, "polling,websocket", ",".join(CLIENT_IPS[:5]), 50)
    assert_fifty_work_and_see_their_own_address(results)


def test_behind_haproxy_reusing_its_backend_connections(
    start_app: StartApp, start_haproxy: HaproxyStarter, node_clients: Path
) -> None:
    backend = free_port()
    serve_behind(start_app, "asgi-cli", ["-b", f"127.0.0.1:{backend}"], "--proxy-headers")
    frontend = start_haproxy(free_port(), backend)["reuse_port"]
    results = run_clients(node_clients, frontend[1], "polling,websocket", ",".join(CLIENT_IPS[:5]), 50)
    assert_fifty_work_and_see_their_own_address(results)


# --- a key the user names: a path segment ---------------------------------------------------------


def owner(doc: str) -> int:
    """The worker of 4 a document's key hashes to (rendezvous over the slots, as the master and workers pick)."""
    return rendezvous_order(key_hash(doc), (0, 1, 2, 3))[0]


def open_doc(port: int, doc: str, source: str) -> dict[str, Any]:
    sock = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
    with BlockingWebSocket(sock, f"ws://127.0.0.1:{port}/doc/{doc}", 10) as websocket:
        answer: dict[str, Any] = json.loads(websocket.recv())
        websocket.send("done")
    return answer


@pytest.mark.parametrize(("route_by", "together"), [("path:2", True), ("ip", False)])
def test_every_editor_of_a_document_meets_on_one_worker(start_app: StartApp, route_by: str, together: bool) -> None:
    command = [sys.executable, "-m", "sticky_server", "apps.doc_app:app", "--asgi", "-w", "4", "-b", "127.0.0.1:0"]
    app = start_app(command=[*command, "--route-by", route_by, "--graceful-timeout", "2"], cwd=HERE)
    port = int(app.wait_for(CLI_LISTENING, 60).group(1))
    docs = [f"doc-{n}" for n in range(12)]
    where = {doc: {open_doc(port, doc, source)["worker"] for source in CLIENT_IPS[:4]} for doc in docs}
    if together:
        assert all(len(workers) == 1 for workers in where.values()), where
        assert len({next(iter(workers)) for workers in where.values()}) >= 3, where  # documents spread
    else:
        assert any(len(workers) > 1 for workers in where.values()), "IP hash kept every document together"


def curl_docs(port: int, docs: list[str]) -> list[dict[str, Any]]:
    """One curl run fetching each document's ``/who``: curl keeps its connection to nginx for all of them."""
    command = ["curl", "-sS", "--max-time", "20", "--interface", CLIENT_IPS[1]]
    for doc in docs:
        command += [f"http://127.0.0.1:{port}/doc/{doc}/who", "-w", "\\n"]
    output = subprocess.run(command, capture_output=True, text=True, timeout=40, check=True).stdout
    return [json.loads(line) for line in output.splitlines() if line.strip()]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize(("route_by", "over"), [("path:2", "tcp"), ("path:2", "unix"), ("ip", "tcp")])
def test_behind_nginx_pooling_its_connections_each_document_reaches_its_worker(
    start_app: StartApp, start_nginx: NginxStarter, shared_folder: Path, route_by: str, over: str
) -> None:
    """nginx keeps idle upstream connections and sends any client's next request (or websocket upgrade) on
    one: each response closing its connection, every request and upgrade is the first of its own.
    Control: by address, every document lands on the one worker of the client's address."""
    command = [sys.executable, "-m", "sticky_server", "apps.doc_app:app", "--asgi", "-w", "4"]
    command += ["--route-by", route_by, "--graceful-timeout", "2"]
    if over == "unix":
        path = shared_folder / "docs.sock"
        start_app(command=[*command, "--uds", str(path)], cwd=HERE).wait_for(r"listening on (\S+) with", 60)
        upstream = f"unix:{path}"
    else:
        backend = free_port()
        start_app(command=[*command, "-b", f"127.0.0.1:{backend}", "--proxy-headers"], cwd=HERE).wait_for(
            CLI_LISTENING, 60
        )
        upstream = f"127.0.0.1:{backend}"
    port = start_nginx(upstream, keepalive=True)
    docs = [f"doc-{n}" for n in range(12)]
    owners = [owner(doc) for doc in docs]
    assert len(set(owners)) >= 3
    over_http = [answer["worker"] for answer in curl_docs(port, docs)]
    over_websockets = [open_doc(port, doc, CLIENT_IPS[1])["worker"] for doc in docs]
    if route_by == "ip":
        assert len(set(over_http + over_websockets)) == 1, (over_http, over_websockets)
        return
    assert over_http == owners and over_websockets == owners, (over_http, over_websockets, owners)
    assert [answer["worker"] for answer in curl_docs(port, docs)] == owners  # and again, the pool warm
