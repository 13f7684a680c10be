"""The WSGI worker on gunicorn's parser, in-process on real loopback sockets (no master needed)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from typing import Any

import pytest
from pytest_mock import MockerFixture

pytest.importorskip("gunicorn")

from sticky_server.adapters import wsgi
from sticky_server.adapters.stdlib import WSGIWorker as WsgirefWorker

seen: list[dict[str, Any]] = []


def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    seen.append(environ)
    if environ["PATH_INFO"] == "/boom":
        raise RuntimeError("the app failed on purpose")
    start_response("200 OK", [("Content-Length", "2")])
    return [b"ok"]


@pytest.fixture
def serve() -> Iterator[Any]:
    """serve(worker) -> a connected client socket whose other end the worker serves."""
    workers: list[wsgi.WSGIWorker] = []
    listener = socket.create_server(("127.0.0.1", 0))
    seen.clear()

    def connect(worker: wsgi.WSGIWorker) -> socket.socket:
        workers.append(worker)
        client = socket.create_connection(listener.getsockname(), timeout=5, source_address=("127.0.0.9", 0))
        accepted, _ = listener.accept()
        worker.add_connection(accepted)
        return client

    yield connect
    for worker in workers:
        worker.stop()
    listener.close()


def read_response(client: socket.socket) -> bytes:
    """One response: the head, then Content-Length bytes (or everything until the close)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = client.recv(4096)
        if not chunk:
            return data
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(
        (int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length")), None
    )
    while length is not None and len(body) < length:
        body += client.recv(4096)
    return head + b"\r\n\r\n" + body


def test_keep_alive_requests_the_raw_socket_and_the_client_address(serve: Any) -> None:
    client = serve(wsgi.WSGIWorker(app))
    with client:
        for _ in range(3):
            client.sendall(b"GET /hello?x=1 HTTP/1.1\r\nHost: test\r\n\r\n")
            response = read_response(client)
            assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b"\r\n\r\nok")
    assert len(seen) == 3
    environ = seen[0]
    assert (environ["PATH_INFO"], environ["QUERY_STRING"], environ["REMOTE_ADDR"]) == ("/hello", "x=1", "127.0.0.9")
    assert isinstance(environ["gunicorn.socket"], socket.socket)  # where simple-websocket looks
    assert environ["wsgi.multithread"] is True


def test_an_idle_connection_is_closed_after_keepalive_seconds(serve: Any) -> None:
    client = serve(wsgi.WSGIWorker(app, keepalive=0.3))
    with client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(client).startswith(b"HTTP/1.1 200")
        began = time.monotonic()
        assert client.recv(100) == b""  # closed by the worker
        assert 0.2 < time.monotonic() - began < 3


def test_a_request_the_parser_refuses_gets_400_and_the_connection_closes(serve: Any) -> None:
    client = serve(wsgi.WSGIWorker(app))
    with client:
        client.sendall(b"NOT HTTP AT ALL\r\n\r\n")
        assert read_response(client).startswith(b"HTTP/1.1 400 Bad Request")
        assert client.recv(100) == b""


def test_an_app_error_is_logged_and_answered_500(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = serve(wsgi.WSGIWorker(app))
    with client, caplog.at_level(logging.ERROR, "sticky_server.adapters.wsgi"):
        client.sendall(b"GET /boom HTTP/1.1\r\nHost: test\r\n\r\n")
        assert read_response(client).startswith(b"HTTP/1.1 500 Internal Server Error")
        assert client.recv(100) == b""
    assert "error handling GET /boom from 127.0.0.9" in caplog.text
    assert "the app failed on purpose" in caplog.text


def access_lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [record.getMessage() for record in caplog.records if record.name == "sticky_server.access"]


def test_one_access_log_line_per_request_at_info(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "sticky_server.access"):
        client = serve(wsgi.WSGIWorker(app))
        with client:
            client.sendall(b"GET /a HTTP/1.1\r\nHost: test\r\n\r\n")
            read_response(client)
            deadline = time.monotonic() + 5  # the line is written once the response is out
            while not access_lines(caplog) and time.monotonic() < deadline:
                time.sleep(0.01)
    lines = access_lines(caplog)
    assert len(lines) == 1 and lines[0].startswith('127.0.0.9 - "GET /a HTTP/1.1" 200 '), lines


def test_no_access_log_when_turned_off(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, "sticky_server.access"):
        client = serve(wsgi.WSGIWorker(app, access_log=False))
        with client:
            client.sendall(b"GET /a HTTP/1.1\r\nHost: test\r\n\r\n")
            read_response(client)
            client.sendall(b"GET /b HTTP/1.1\r\nHost: test\r\n\r\n")
            read_response(client)  # the first request's line would have been written by now
    assert not access_lines(caplog)


def test_stop_ends_an_idle_keep_alive_connection(serve: Any) -> None:
    worker = wsgi.WSGIWorker(app, shutdown_timeout=5)
    client = serve(worker)
    with client:
        client.sendall(b"GET / HTTP/1.1\r\nHost: test\r\n\r\n")
        read_response(client)
        worker.stop()
        assert client.recv(100) == b""


def test_without_gunicorn_it_falls_back_to_wsgiref_and_says_what_to_install(
    mocker: MockerFixture, caplog: pytest.LogCaptureFixture
) -> None:
    mocker.patch.object(wsgi, "gunicorn_available", False)
    with caplog.at_level(logging.WARNING, "sticky_server.adapters.wsgi"):
        worker = wsgi.WSGIWorker(app)
    assert isinstance(worker._fallback, WsgirefWorker)
    assert "pip install 'sticky-server[wsgi]'" in caplog.text


def test_keepalive_must_be_positive() -> None:
    with pytest.raises(ValueError, match="keepalive must be a number of seconds, above 0"):
        wsgi.WSGIWorker(app, keepalive=0)


def reading_app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    body = environ["wsgi.input"].read()
    start_response("200 OK", [("Content-Length", str(len(body)))])
    return [body]


def test_a_malformed_chunked_body_is_a_400_not_an_error(serve: Any, caplog: pytest.LogCaptureFixture) -> None:
    client = serve(wsgi.WSGIWorker(reading_app))
    with caplog.at_level(logging.DEBUG, "sticky_server"):
        client.sendall(b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n-1\r\nxx\r\n0\r\n\r\n")
        assert read_response(client).startswith(b"HTTP/1.1 400 Bad Request")
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], caplog.records


def test_a_request_head_trickled_a_byte_at_a_time_is_cut_off_at_the_keepalive(serve: Any) -> None:
    client = serve(wsgi.WSGIWorker(app, keepalive=0.6))
    began = time.monotonic()
    with pytest.raises(OSError):
        for byte in b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40:
            client.sendall(bytes([byte]))
            time.sleep(0.1)  # every read gets a byte within keepalive: only the deadline ends it
            if client.recv(1, socket.MSG_DONTWAIT | socket.MSG_PEEK) == b"":
                raise ConnectionResetError("closed by the server")
    assert time.monotonic() - began < 2.5


def _blocking_app(release: Any) -> Any:
    def blocking(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        release.wait(10)
        start_response("200 OK", [("Content-Length", "2")])
        return [b"ok"]

    return blocking


def test_connections_beyond_max_connections_wait_without_a_thread_and_are_served_in_turn(serve: Any) -> None:
    import threading

    release = threading.Event()
    worker = wsgi.WSGIWorker(_blocking_app(release), max_connections=2)
    threads_before = threading.active_count()
    clients = [serve(worker) for _ in range(6)]
    for client in clients:
        client.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(0.3)
    assert threading.active_count() - threads_before <= 2
    assert not worker.has_room()
    release.set()
    for client in clients:
        assert read_response(client).startswith(b"HTTP/1.1 200 OK")
    for client in clients:
        client.close()
    assert wait_for(worker.has_room)


def wait_for(condition: Any, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return False


@pytest.mark.parametrize(
    "request_bytes",
    [
        b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 11\r\n\r\nhello world",
        b"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nb\r\nhello world\r\n0\r\n\r\n",
    ],
)
def test_a_body_over_max_body_size_is_a_413(serve: Any, request_bytes: bytes) -> None:
    client = serve(wsgi.WSGIWorker(reading_app, max_body_size=10))
    client.sendall(request_bytes)
    assert read_response(client).startswith(b"HTTP/1.1 413")
    small = serve(wsgi.WSGIWorker(reading_app, max_body_size=11))
    small.sendall(request_bytes)
    response = read_response(small)
    assert response.startswith(b"HTTP/1.1 200 OK") and response.endswith(b"hello world")


def test_gunicorns_head_limits_apply(serve: Any) -> None:
    client = serve(wsgi.WSGIWorker(app, limit_request_line=20))
    client.sendall(b"GET /" + b"a" * 40 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert read_response(client).startswith(b"HTTP/1.1 414")
    fields = serve(wsgi.WSGIWorker(app, limit_request_fields=2))
    fields.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nA: 1\r\nB: 2\r\nC: 3\r\n\r\n")
    assert read_response(fields).startswith(b"HTTP/1.1 431")
