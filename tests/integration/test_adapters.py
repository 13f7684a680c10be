"""Every adapter behind a real master: real servers, real HTTP and websocket clients, real processes.

For each adapter (the id of every test names it): clients from distinct 127.x
addresses each land on the worker their address hashes to, several requests run
over one keep-alive connection, a websocket stays connected on its worker while
the same client makes HTTP requests, and a stop lets a request in flight finish
and runs the framework's shutdown hook before every process exits 0. Then the
same over TLS, with a self-signed certificate made for the test.
"""

from __future__ import annotations

import http.client
import json
import shutil
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sticky_server.balancer import IPHashBalancer, address_key
from sticky_server.sessions import key_hash, rendezvous_order

from .conftest import StartApp
from .harness import CLIENT_IPS, HERE, ServerProcess
from .websocket_client import BlockingWebSocket

ADAPTER_APP = HERE / "apps" / "adapter_app.py"
WORKERS = 2
ADAPTERS = ["http", "wsgi", "gunicorn", "asyncio", "aiohttp", "asgi", "tornado"]
WEBSOCKETS = {"gunicorn", "aiohttp", "asgi", "tornado"}
ASYNC_ADAPTERS = {"asyncio", "aiohttp", "asgi", "tornado"}
NO_KEEP_ALIVE = {"wsgi"}  # wsgiref: HTTP/1.0, one request per connection
TIMEOUT = 15.0


def expected_slot(ip: str) -> int:
    return IPHashBalancer().slot_for_key(address_key(ip), tuple(range(WORKERS)))


def start(start_app: StartApp, adapter: str, tmp_path: Path, **env: str) -> tuple[ServerProcess, tuple[str, int]]:
    shutdown_dir = tmp_path / f"shutdown-{adapter}"
    shutdown_dir.mkdir()
    server = start_app(
        env={"APP_ADAPTER": adapter, "APP_WORKERS": str(WORKERS), "APP_SHUTDOWN_DIR": str(shutdown_dir), **env},
        script=ADAPTER_APP,
    )
    address = server.wait_listening()
    return server, address


def connection(address: tuple[str, int], ip: str, tls: ssl.SSLContext | None = None) -> http.client.HTTPConnection:
    if tls is None:
        return http.client.HTTPConnection(*address, timeout=TIMEOUT, source_address=(ip, 0))
    return http.client.HTTPSConnection(*address, timeout=TIMEOUT, source_address=(ip, 0), context=tls)


def get(conn: http.client.HTTPConnection, path: str = "/") -> dict[str, Any]:
    conn.request("GET", path)
    response = conn.getresponse()
    body = response.read()
    assert response.status == 200, (response.status, body)
    reply: dict[str, Any] = json.loads(body)
    return reply


def check_requests(adapter: str, address: tuple[str, int], ips: list[str], tls: ssl.SSLContext | None = None) -> None:
    """Each client: two connections of three requests; all on its own slot, each connection kept alive."""
    for ip in ips:
        for _ in range(2):
            conn = connection(address, ip, tls)
            try:
                replies = []
                for _ in range(3):
                    replies.append(get(conn))
                    if adapter in NO_KEEP_ALIVE:
                        conn.close()  # the server closes after each answer
                local_port = conn.sock.getsockname()[1] if conn.sock is not None else None
            finally:
                conn.close()
            for reply in replies:
                assert reply["adapter"] == adapter
                assert reply["slot"] == expected_slot(ip), f"{adapter}: {ip} landed on slot {reply['slot']}"
                assert reply["client"][0] == ip, f"{adapter}: the app saw {reply['client']} for {ip}"
                assert reply["started"], f"{adapter}: the app's startup did not run before serving"
                # work() runs an asynchronous worker on uvloop, installed with the test extra (loop="auto").
                assert reply["loop"] == ("uvloop" if adapter in ASYNC_ADAPTERS else None), reply
            if adapter not in NO_KEEP_ALIVE:
                # Three answers from one process, to the one client port: one connection, kept alive.
                assert len({reply["pid"] for reply in replies}) == 1
                assert [reply["client"][1] for reply in replies] == [local_port] * 3, f"{adapter}: {replies}"


def websocket(address: tuple[str, int], ip: str, tls: ssl.SSLContext | None = None) -> BlockingWebSocket:
    sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(ip, 0))
    scheme = "wss" if tls is not None else "ws"
    uri = f"{scheme}://{address[0]}:{address[1]}/ws"
    return BlockingWebSocket(sock, uri, TIMEOUT, tls, server_hostname=address[0])


def echo(ws: BlockingWebSocket, text: str) -> dict[str, Any]:
    ws.send(text)
    reply: dict[str, Any] = json.loads(ws.recv(timeout=TIMEOUT))
    assert reply["echo"] == text
    return reply


def stop_with_request_in_flight(adapter: str, server: ServerProcess, address: tuple[str, int]) -> None:
    """SIGTERM while /slow runs: it must still be answered; every worker's shutdown hook must run."""
    answers: list[Any] = []
    ip = CLIENT_IPS[0]

    def slow() -> None:
        conn = connection(address, ip)
        try:
            answers.append(get(conn, "/slow"))
        except Exception as exc:  # recorded and asserted on below
            answers.append(exc)
        finally:
            conn.close()

    client = threading.Thread(target=slow, daemon=True)
    client.start()
    try:
        server.wait_for(r"^SLOW STARTED \d+$", TIMEOUT)
    except AssertionError as exc:
        client.join(1)
        raise AssertionError(f"{adapter}: /slow never reached the app; the client got {answers}") from exc
    assert server.stop(timeout=TIMEOUT + 10) == 0, f"{adapter}: the master did not exit 0\n{server.output_tail()}"
    client.join(TIMEOUT)
    assert len(answers) == 1 and isinstance(answers[0], dict), f"{adapter}: the request in flight got {answers}"
    assert answers[0]["slot"] == expected_slot(ip)
    for pid in server.recorded_pids("worker"):
        assert server.count(rf"worker \d+ \(pid {pid}\) exited with code 0$") == 1, server.output_tail()


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_serves_sticky_keep_alive_websocket_and_stops_cleanly(
    adapter: str, start_app: StartApp, tmp_path: Path
) -> None:
    server, address = start(start_app, adapter, tmp_path)
    ips = CLIENT_IPS[:8]
    assert len({expected_slot(ip) for ip in ips}) == WORKERS  # the clients cover every worker
    if adapter in WEBSOCKETS:
        sockets = {ip: websocket(address, ip) for ip in ips[:4]}
        try:
            for ip, ws in sockets.items():
                assert echo(ws, f"hello from {ip}")["slot"] == expected_slot(ip), adapter
            check_requests(adapter, address, ips)
            for ip, ws in sockets.items():  # still connected, still on its worker
                assert echo(ws, f"again from {ip}")["slot"] == expected_slot(ip), adapter
        finally:
            for ws in sockets.values():
                ws.close()
    else:
        check_requests(adapter, address, ips)
    worker_pids = set(server.recorded_pids("worker"))
    stop_with_request_in_flight(adapter, server, address)
    shutdown_dir = tmp_path / f"shutdown-{adapter}"
    stopped = {int(entry.name.split("-")[1]) for entry in shutdown_dir.iterdir()}
    assert stopped == worker_pids, f"{adapter}: shutdown hook ran in {stopped}, workers were {worker_pids}"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for 127.0.0.1, made by the openssl command for this test run."""
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate (apt-get install openssl)")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"),
            *("-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1", "-days", "2"),
            *("-keyout", str(key), "-out", str(cert)),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )
    yield cert, key


@pytest.mark.parametrize("adapter", ADAPTERS)
def test_adapter_terminates_tls(
    adapter: str, start_app: StartApp, tmp_path: Path, certificate: tuple[Path, Path]
) -> None:
    cert, key = certificate
    server, address = start(start_app, adapter, tmp_path, APP_TLS_CERT=str(cert), APP_TLS_KEY=str(key))
    client_tls = ssl.create_default_context(cafile=str(cert))  # verifies the certificate and 127.0.0.1
    check_requests(adapter, address, CLIENT_IPS[:4], client_tls)
    if adapter in WEBSOCKETS:
        ip = CLIENT_IPS[1]
        with websocket(address, ip, client_tls) as ws:
            assert echo(ws, "over tls")["slot"] == expected_slot(ip)
    # A client that speaks plain HTTP to the TLS port is refused without hurting the next one.
    with socket.create_connection(address, timeout=TIMEOUT, source_address=(CLIENT_IPS[2], 0)) as plain:
        plain.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        plain.settimeout(TIMEOUT)
        try:
            while plain.recv(4096):
                pass
        except ConnectionResetError:
            pass
    check_requests(adapter, address, CLIENT_IPS[2:3], client_tls)
    assert server.stop(timeout=TIMEOUT + 10) == 0, server.output_tail()


@pytest.mark.parametrize("adapter", [name for name in ADAPTERS if name not in NO_KEEP_ALIVE])
def test_keep_alive_requests_never_wait_for_a_delayed_ack(start_app: StartApp, adapter: str, tmp_path: Path) -> None:
    """A gross-latency check, not a benchmark: with Nagle on, a response written in two pieces waits
    for the client's delayed ACK (40 ms on Linux), so 200 requests would take about 8 s."""
    _server, address = start(start_app, adapter, tmp_path)
    conn = connection(address, CLIENT_IPS[0])
    try:
        get(conn)  # the connection is up and the worker warm
        began = time.monotonic()
        for _ in range(200):
            get(conn)
        elapsed = time.monotonic() - began
    finally:
        conn.close()
    assert elapsed < 2.0, f"200 keep-alive requests took {elapsed:.2f} s"


# --- route_by a named key: each request on a connection of its own ------------------------------------

ROOMS = [f"room-{n}" for n in range(8)]


def curl_rooms(address: tuple[str, int], ip: str) -> list[tuple[int, int]]:
    """curl fetching ``/?room=R`` for every room in one run (curl reuses a connection it may keep):
    (the slot that answered, the connections curl opened for it) for each."""
    command = ["curl", "-sS", "--max-time", str(TIMEOUT), "--interface", ip]
    for room in ROOMS:
        command += [f"http://{address[0]}:{address[1]}/?room={room}", "-w", " %{num_connects}\n"]
    lines = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT * 2, check=True).stdout
    answers = [line.rsplit(" ", 1) for line in lines.splitlines() if line.strip()]
    return [(json.loads(body)["slot"], int(connects)) for body, connects in answers]


@pytest.mark.skipif(shutil.which("curl") is None, reason="needs curl")
@pytest.mark.parametrize("adapter", [name for name in ADAPTERS if name != "asyncio"])
@pytest.mark.parametrize("route_by", ["query:room", "ip"])
def test_each_request_of_a_kept_alive_client_reaches_its_key_s_worker(
    start_app: StartApp, adapter: str, route_by: str, tmp_path: Path
) -> None:
    """curl sends the rooms' requests on one connection when the server keeps it; with ``route_by`` naming the
    key every response closes its connection, so each request comes on a new one, routed by its own key.
    Control: by address, one connection's requests all reach one worker, whatever room they name."""
    server, address = start(start_app, adapter, tmp_path, APP_ROUTE_BY=route_by)
    answers = curl_rooms(address, CLIENT_IPS[0])
    slots = [slot for slot, _ in answers]
    owners = [rendezvous_order(key_hash(room), tuple(range(WORKERS)))[0] for room in ROOMS]
    assert len(set(owners)) == WORKERS  # the rooms belong to different workers
    if route_by == "ip":
        assert set(slots) == {expected_slot(CLIENT_IPS[0])} and slots != owners
        return
    assert slots == owners, server.output_tail()
    assert all(connects == 1 for _, connects in answers), answers  # a connection per request
    assert server.stop(timeout=TIMEOUT + 10) == 0, server.output_tail()


def test_a_worker_that_cannot_close_each_response_says_so(start_app: StartApp, tmp_path: Path) -> None:
    server, _address = start(start_app, "asyncio", tmp_path, APP_ROUTE_BY="query:room")
    server.wait_for(r"route_by=query:room: \w+ cannot end each HTTP response's connection", TIMEOUT)
    assert server.stop(timeout=TIMEOUT + 10) == 0, server.output_tail()
