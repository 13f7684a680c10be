"""Hostile input against a real master: nothing one client or one worker sends ends it, leaks its
descriptors or drops other connections.

Each defect found by the outside trial has its regression test here; the hypothesis
suites at the end drive every parser the master runs on bytes it did not write (PROXY
v1/v2 headers, forwarded headers, a worker's control frames, descriptors attached where
none are declared) over real sockets, and check after each run that the master still
serves and holds no more descriptors than before.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sticky_server.protocol.frames import HEADER, FrameKind, pack_count

from .conftest import StartApp
from .harness import (
    CLIENT_IPS,
    HERE,
    SIGNATURE,
    ServerProcess,
    exchange,
    expected_slot,
    free_port,
    open_fds,
    proxy_v1,
    proxy_v2,
    read_reply,
    reply_of,
    request,
    wait_until,
)

TIMEOUT = 15.0
CLI = [sys.executable, "-m", "sticky_server", "apps.cli_apps:LineWorker", "-w", "2", "-b", "127.0.0.1:0"]
LISTENING = r"listening on 127\.0\.0\.1:(\d+) with"
HOSTILE = settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def command(address: tuple[str, int], text: str, source: str = CLIENT_IPS[0]) -> dict[str, Any]:
    return request(address, source=source, line=f"cmd {text}")


def settle_fds(server: ServerProcess, at_most: int, timeout: float = TIMEOUT) -> int:
    """The master's open descriptors once they are down to ``at_most`` (or what they are after ``timeout``)."""
    wait_until(lambda: open_fds(server.process.pid) <= at_most, timeout)
    return open_fds(server.process.pid)


def http_exchange(address: tuple[str, int], head: bytes) -> dict[str, Any]:
    return reply_of(exchange(address, head))


# --- 1. forwarded headers: an entry must be an IP address to be believed or passed on ------------


@pytest.mark.parametrize(
    ("trusted", "header"),
    [
        ("", b"X-Forwarded-For: 127.0.0.1%" + b"A" * 300),  # a zone id: stripped to look trusted
        ("", "X-Forwarded-For: 127.0.0.1%äöü".encode("latin-1")),  # non-ASCII
        ("*", b"X-Forwarded-For: " + b"x" * 300),
        ("*", b'X-Forwarded-For: for="[::1%' + b"B" * 300 + b']"'),
    ],
)
def test_a_forwarded_entry_that_is_no_ip_address_is_never_routed_by(
    start_app: StartApp, trusted: str, header: bytes
) -> None:
    forwarded = "forwarded" if b"for=" in header else "x-forwarded-for"
    header = header.replace(b"X-Forwarded-For", b"Forwarded") if forwarded == "forwarded" else header
    env = {"APP_WORKERS": "2", "APP_FORWARDED": forwarded, "APP_MODE": "http"}
    if trusted:
        env["APP_TRUSTED"] = trusted
    server = start_app(env)
    address = server.wait_listening()

    for _ in range(3):
        reply = http_exchange(address, b"GET / HTTP/1.1\r\nHost: t\r\n" + header + b"\r\n\r\n")
        assert reply["client"] == reply["peer"], reply  # routed by the proxy's own address
    assert server.process.poll() is None
    assert http_exchange(address, b"GET / HTTP/1.1\r\nX-Forwarded-For: 203.0.113.9\r\n\r\n")["line"]


# --- 2 and settle: a worker's message that is no valid JSON, or too big, costs only that worker ---


@pytest.mark.parametrize(
    ("text", "logged"),
    [
        ("send-bigint", "message is not valid JSON"),  # past the int-string limit, through the public API
        (f"raw {(HEADER.pack(FrameKind.SEND, 0, 0, 3) + b'NaN').hex()}", "NaN is not JSON"),
        ("raw-send 2000000", "a message of 2000000 bytes .max_message_size is 1048576."),
    ],
)
def test_an_invalid_message_from_a_worker_kills_that_worker_only(start_app: StartApp, text: str, logged: str) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_CHANNEL": "1"})
    address = server.wait_listening()
    first = request(address, source=CLIENT_IPS[0])

    with contextlib.suppress(ConnectionError):  # the master may kill the worker before it answers
        command(address, text)
    server.wait_for(logged, TIMEOUT)
    server.wait_for(rf"EXIT {first['slot']} -9", TIMEOUT)
    assert server.process.poll() is None
    assert wait_until(lambda: _serves(address), TIMEOUT)


def _serves(address: tuple[str, int], source: str = CLIENT_IPS[0]) -> bool:
    try:
        return bool(request(address, source=source, timeout=2))
    except OSError:
        return False


# --- 3. descriptors a worker attaches never stay in the master -----------------------------------


@pytest.mark.parametrize(
    "frame",
    [
        HEADER.pack(FrameKind.SEND, 0, 0, 2) + b"{}",  # a valid message, with descriptors it does not declare
        HEADER.pack(FrameKind.SEND, 0, 2, 2) + b"{}",  # declared, on a kind that carries none
        b"",  # descriptors with no frame at all (a byte of nothing: one zero byte is sent)
    ],
)
def test_descriptors_from_a_worker_are_closed_and_the_worker_replaced(start_app: StartApp, frame: bytes) -> None:
    server = start_app({"APP_WORKERS": "2"})
    address = server.wait_listening()
    first = request(address, source=CLIENT_IPS[0])
    time.sleep(0.6)  # the worker's first close report has gone out
    before = open_fds(server.process.pid)

    with contextlib.suppress(ConnectionError):  # the master may kill the worker before it answers
        command(address, f"raw {(frame or bytes(1)).hex()} 2")
    server.wait_for(r"sent an invalid frame .*descriptor", TIMEOUT)
    assert wait_until(lambda: first["pid"] not in server.worker_pids(), TIMEOUT)
    assert wait_until(lambda: _serves(address), TIMEOUT)
    assert settle_fds(server, before) <= before


# --- 4. a worker at its descriptor limit keeps what it has --------------------------------------


def _hold(address: tuple[str, int], source: str) -> socket.socket:
    sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(source, 0))
    sock.sendall(b"hold\n")
    return sock


def test_workers_are_kept_under_their_descriptor_limit_and_lose_nothing(start_app: StartApp) -> None:
    # Limit 64: rule 6 lets each worker hold 32 live connections; 70 clients from one address.
    server = start_app({"APP_WORKERS": "2", "APP_MODE": "hold", "APP_WORKER_NOFILE": "64"})
    address = server.wait_listening()
    held = [_hold(address, CLIENT_IPS[0]) for _ in range(70)]
    try:
        replies = [read_reply(sock) for sock in held[:64]]  # every one of the first 64 is served
        assert {reply["slot"] for reply in replies} == {0, 1}
        server.wait_for(r"reached its descriptor ceiling .*limit 64.*ulimit -n", TIMEOUT)
        # The 6 others wait in the kernel's backlog; as clients leave, they are served.
        for sock in held[:10]:
            sock.close()
        replies += [read_reply(sock) for sock in held[64:]]
        assert len(replies) == 70
        for sock in held[10:64]:  # the connections the workers held all along are alive
            sock.sendall(b"x")
        assert server.count(r"lost \d+ connection\(s\) handed to worker") == 0
        stats = _stats(server)
        assert [worker["descriptor_limit"] for worker in stats["workers"]] == [64, 64]
        assert stats["lost_no_room"] == 0
    finally:
        for sock in held:
            sock.close()


def test_a_worker_that_runs_out_anyway_keeps_serving_and_says_so(start_app: StartApp) -> None:
    # Its own code holds 40 descriptors, more than rule 6's reserve: the kernel truncates hand-offs.
    server = start_app(  # the master path: hand-offs the kernel truncates at the worker's limit
        {
            "APP_STEERING": "master",
            "APP_WORKERS": "2",
            "APP_MODE": "hold",
            "APP_WORKER_NOFILE": "64",
            "APP_WORKER_EXTRA_FDS": "40",
        }
    )
    address = server.wait_listening()
    pids = sorted(server.worker_pids())
    held: list[socket.socket] = []
    served: list[socket.socket] = []
    waiting: list[socket.socket] = []
    lost = 0
    try:
        for _ in range(40):
            sock = _hold(address, CLIENT_IPS[0])
            held.append(sock)
            sock.settimeout(1.0)
            try:
                read_reply(sock)
                served.append(sock)
            except TimeoutError:
                waiting.append(sock)  # parked: both workers are at their ceiling
            except OSError:
                lost += 1
        server.wait_for(r"lost \d+ connection\(s\) handed to worker \d: it is at its descriptor limit \(64\)", TIMEOUT)
        assert sorted(server.worker_pids()) == pids  # no worker died
        stats = _stats(server)
        assert lost == stats["lost_no_room"] >= 1  # those, and only those, were closed
        for sock in served:  # what the workers hold still works
            sock.sendall(b"x")
        for sock in served[: len(waiting) + 5]:
            sock.close()
        for sock in waiting:  # the parked ones are served once room is made
            sock.settimeout(TIMEOUT)
            assert read_reply(sock)["line"] == "hold"
    finally:
        for sock in held:
            sock.close()
    assert wait_until(lambda: _serves(address, CLIENT_IPS[1]), TIMEOUT)


def _stats(server: ServerProcess) -> dict[str, Any]:
    server.send_signal(signal.SIGUSR1)
    line = server.wait_for(r"^STATS (.*)$", TIMEOUT, start=len(server.lines))
    stats: dict[str, Any] = json.loads(line.group(1))
    return stats


# --- 5. a header in tiny segments is not mistaken for end-of-stream -------------------------------


def test_proxy_headers_in_one_byte_segments_all_arrive(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1"})
    address = server.wait_listening()
    results: list[Any] = [None] * 40

    def client(n: int) -> None:
        data = proxy_v2(f"203.0.113.{n + 1}", 6000 + n) + f"byte-by-byte {n}\n".encode()
        try:
            with socket.create_connection(address, timeout=TIMEOUT) as sock:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                for byte in data:
                    sock.send(bytes([byte]))
                    time.sleep(0.001)
                results[n] = reply_of(sock.makefile("rb").readline())
        except (OSError, ValueError) as exc:
            results[n] = exc

    threads = [threading.Thread(target=client, args=(n,)) for n in range(40)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    failed = [result for result in results if not isinstance(result, dict)]
    assert not failed, f"{len(failed)} of 40 failed: {failed[:3]}"
    assert sorted(result["client"][1] for result in results) == list(range(6000, 6040))


# --- 6. the metrics port costs the master a bounded number of threads and nothing else -----------


def test_idle_metrics_connections_never_hold_up_the_server(start_app: StartApp) -> None:
    port = free_port()
    server = start_app(command=[*CLI, "--metrics", f"127.0.0.1:{port}"], cwd=HERE)
    address = ("127.0.0.1", int(server.wait_for(LISTENING, TIMEOUT).group(1)))
    threads_before = len(os.listdir(f"/proc/{server.process.pid}/task"))
    idle = []
    for _ in range(192):
        with contextlib.suppress(OSError):
            idle.append(socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT))
    try:
        began = time.monotonic()
        for ip in CLIENT_IPS[:10]:
            assert "slot" in request(address, source=ip, timeout=5)
        assert time.monotonic() - began < 5
        threads = len(os.listdir(f"/proc/{server.process.pid}/task"))
        # MAX_SCRAPES scrape threads, and the threads of scrapes just evicted for newer ones, still exiting
        # (192 idle connections keep the eviction going): bounded, not one per connection.
        assert threads <= threads_before + 8 + 2, threads
    finally:
        for sock in idle:
            sock.close()
    # The idle ones went, so scrapes are answered, HEAD too (no body).
    assert wait_until(lambda: _scrape(port, "HEAD") == b"", 10.0)
    text = (_scrape(port, "GET") or b"").decode()
    for name in ("process_open_fds", "process_resident_memory_bytes", "process_start_time_seconds"):
        assert f"\n{name} " in text
    assert "handoff_rate" not in text
    assert 'sticky_server_connections_handed_off_total{slot="0"}' in text


def _http(address: tuple[str, int], request: bytes, timeout: float, source: str | None = None) -> bytes | None:
    """The body of a 200 answer to ``request`` (read until the server closes); None for anything else."""
    try:
        with socket.create_connection(address, timeout=timeout, source_address=(source, 0) if source else None) as sock:
            sock.sendall(request)
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
    except OSError:
        return None
    head, _, body = data.partition(b"\r\n\r\n")
    return body if head.startswith((b"HTTP/1.0 200", b"HTTP/1.1 200")) else None


def _scrape(port: int, method: str) -> bytes | None:
    return _http(("127.0.0.1", port), f"{method} /metrics HTTP/1.0\r\n\r\n".encode(), 3)


# --- settle: workers are non-dumpable; a graceful stop serves the backlog; resized worker counts ----


def test_workers_are_not_dumpable(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "1"})
    address = server.wait_listening()
    assert command(address, "dumpable")["result"] == 0


def test_a_graceful_stop_serves_connections_still_in_the_backlog(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2"})
    address = server.wait_listening()
    assert _serves(address)
    os.kill(server.process.pid, signal.SIGSTOP)  # the master accepts nothing meanwhile
    waiting = []
    try:
        # More than one accept burst (64): the stop comes while some still wait in the backlog.
        for n in range(100):
            ip = CLIENT_IPS[n % len(CLIENT_IPS)]
            sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(ip, 0))
            sock.sendall(b"in the backlog\n")
            waiting.append(sock)
        os.kill(server.process.pid, signal.SIGTERM)
    finally:
        os.kill(server.process.pid, signal.SIGCONT)
    for sock in waiting:
        with sock:
            assert read_reply(sock)["line"] == "in the backlog"
    assert server.wait_exit(TIMEOUT) == 0


def test_send_reaches_a_slot_added_by_sigttin(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "1", "APP_CHANNEL": "1"})
    address = server.wait_listening()
    server.send_signal(signal.SIGTTIN)
    server.wait_for(r"^START 1$", TIMEOUT)
    # A worker asks the master to send to slot 1, which did not exist at start.
    command(address, 'send {"to": 1, "data": "to the new slot"}')
    server.wait_for(r'^FROM \d \{"to": 1', TIMEOUT)
    assert server.count("needs a worker id from 0 to 0") == 0
    assert wait_until(lambda: _inbox_of_slot(address, 1) == [[None, "to the new slot"]], TIMEOUT)


def _inbox_of_slot(address: tuple[str, int], slot: int) -> Any:
    for ip in CLIENT_IPS:
        reply = command(address, "inbox", source=ip)
        if reply["slot"] == slot:
            return reply["result"]
    return None


# --- 7. pid and stats files ------------------------------------------------------------------------


def test_a_planted_symlink_is_refused_as_pid_file_and_replaced_as_stats_file(
    start_app: StartApp, tmp_path: Path
) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    pid_file = tmp_path / "app.pid"
    pid_file.symlink_to(victim)
    refused = start_app(command=[*CLI, "--pid", str(pid_file)], cwd=HERE)
    assert refused.wait_exit(TIMEOUT) == 2
    assert "is a symbolic link; refusing to follow it" in refused.output
    pid_file.unlink()

    (tmp_path / "app.pid.stats").symlink_to(victim)
    (tmp_path / "app.pid.stats.tmp").symlink_to(victim)
    server = start_app(command=[*CLI, "--pid", str(pid_file)], cwd=HERE)
    server.wait_for(LISTENING, TIMEOUT)
    assert pid_file.read_text() == f"{server.process.pid}\n"
    assert pid_file.stat().st_mode & 0o777 == 0o644
    server.send_signal(signal.SIGUSR1)
    assert wait_until(lambda: not (tmp_path / "app.pid.stats").is_symlink(), TIMEOUT)
    assert json.loads((tmp_path / "app.pid.stats").read_text())["pid"] == server.process.pid
    assert victim.read_text() == "precious\n"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to make a file another user owns")
def test_a_pid_file_another_user_owns_is_refused_by_the_server_and_by_status(
    start_app: StartApp, tmp_path: Path
) -> None:
    tmp_path.chmod(0o755)
    pid_file = tmp_path / "app.pid"
    pid_file.write_text("1\n")
    os.chown(pid_file, 65534, 65534)
    server = start_app(command=[*CLI, "--pid", str(pid_file)], cwd=HERE)
    assert server.wait_exit(TIMEOUT) == 2
    assert "belongs to uid 65534, not to you or root; refusing to trust it" in server.output
    assert pid_file.read_text() == "1\n"

    status = subprocess.run(
        [sys.executable, "-m", "sticky_server", "status", "--pid", str(pid_file)],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
    )
    assert status.returncode == 1 and "refusing to trust it" in status.stderr


# --- the class: hypothesis over real sockets -------------------------------------------------------


def _proxy_bytes() -> st.SearchStrategy[bytes]:
    valid = st.sampled_from([proxy_v1("203.0.113.5"), proxy_v2("203.0.113.6"), proxy_v2("2001:db8::7")])
    mutated = st.tuples(valid, st.integers(0, 60), st.binary(min_size=1, max_size=4)).map(
        lambda t: t[0][: t[1]] + t[2] + t[0][t[1] + len(t[2]) :]
    )
    prefixed = st.binary(max_size=300).map(lambda b: SIGNATURE + b)
    return st.one_of(st.binary(max_size=300), mutated, prefixed, st.binary(max_size=120).map(lambda b: b"PROXY " + b))


def _send_in_pieces(address: tuple[str, int], data: bytes, cuts: list[int]) -> bytes:
    with socket.create_connection(address, timeout=5) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with contextlib.suppress(OSError):
            for start, end in zip([0, *cuts], [*cuts, len(data)], strict=True):
                sock.sendall(data[start:end])
            sock.shutdown(socket.SHUT_WR)
        answer = b""
        with contextlib.suppress(OSError):
            while chunk := sock.recv(65536):
                answer += chunk
    return answer


def test_hostile_proxy_headers_never_hurt_the_master(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_PROXY": "1", "APP_HEADER_TIMEOUT": "1"})
    address = server.wait_listening()
    assert reply_of(exchange(address, proxy_v1("198.51.100.3") + b"first\n"))["line"] == "first"
    before = open_fds(server.process.pid)

    @HOSTILE
    @given(_proxy_bytes(), st.lists(st.integers(1, 299), max_size=4, unique=True))
    def run(data: bytes, cuts: list[int]) -> None:
        _send_in_pieces(address, data + b"line\n", sorted(cut for cut in cuts if cut < len(data)))
        assert server.process.poll() is None

    run()
    assert reply_of(exchange(address, proxy_v1("198.51.100.3") + b"still\n"))["line"] == "still"
    assert server.count("Traceback") + server.count("could not be routed") == 0, server.output
    assert settle_fds(server, before) <= before


_LATIN1 = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters=",\r\n"), max_size=80)


@pytest.mark.parametrize("forwarded", ["x-forwarded-for", "forwarded"])
def test_hostile_forwarded_headers_never_hurt_the_master(start_app: StartApp, forwarded: str) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_FORWARDED": forwarded, "APP_TRUSTED": "*", "APP_MODE": "http"})
    address = server.wait_listening()

    @HOSTILE
    @given(st.lists(_LATIN1, min_size=1, max_size=4))
    def run(entries: list[str]) -> None:
        value = ", ".join(entries if forwarded == "x-forwarded-for" else [f"for={entry}" for entry in entries])
        head = b"GET / HTTP/1.1\r\n" + forwarded.encode() + b": " + value.encode("latin-1") + b"\r\n\r\n"
        host = http_exchange(address, head)["client"][0]
        # Routed by an address the header gave, in canonical form, or by the peer's.
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        assert socket.inet_ntop(family, socket.inet_pton(family, host)) == host

    run()
    assert server.process.poll() is None


def test_with_the_fallback_any_first_bytes_are_routed_by_the_peer_or_the_header(start_app: StartApp) -> None:
    """forwarded_header_fallback (the command's Unix sockets): bytes that are no HTTP request go as they come.

    Whatever a trusted peer sends first, the connection reaches a worker, which answers
    the line it reads: routed by the peer at once when the bytes cannot start an HTTP
    request, after ``header_timeout`` when they could but never finish one. Nothing is
    closed unanswered, and the master neither fails nor keeps a descriptor.
    """
    server = start_app(
        {
            "APP_WORKERS": "2",
            "APP_FORWARDED": "x-forwarded-for",
            "APP_FORWARDED_FALLBACK": "1",
            "APP_HEADER_TIMEOUT": "0.3",
        }
    )
    address = server.wait_listening()
    before = open_fds(server.process.pid)

    @HOSTILE
    @given(st.binary(max_size=64).filter(lambda data: b"\n" not in data))
    def run(data: bytes) -> None:
        with socket.create_connection(address, timeout=TIMEOUT, source_address=(CLIENT_IPS[3], 0)) as sock:
            sock.sendall(data + b"\n")
            reply = read_reply(sock)
        assert reply["client"][0] == CLIENT_IPS[3]

    run()
    assert server.process.poll() is None
    assert server.count("Traceback") + server.count("could not be routed") == 0, server.output
    assert settle_fds(server, before) <= before


_HEAD_TEXT = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF, exclude_characters="\r\n"), max_size=60)


def _request_heads() -> st.SearchStrategy[bytes]:
    """Request heads with keys good and bad (garbage, huge, encoded, repeated), and bytes that are none."""
    key = st.one_of(_HEAD_TEXT, st.just("a" * 600), st.sampled_from(["", "%", "%zz", "9999.x", "2.abc", "k&k=2"]))
    headers = st.lists(_HEAD_TEXT, max_size=3).map(lambda lines: "".join(f"{line}\r\n" for line in lines))
    ending = st.sampled_from(["\r\n", ""])  # a complete head, or one the client never finishes
    http = st.tuples(st.sampled_from(["GET", "POST", "get", "GET GET"]), key, headers, ending).map(
        lambda h: f"{h[0]} /room?x=1&k={h[1]} HTTP/1.1\r\nCookie: k=1\r\n{h[2]}{h[3]}".encode("latin-1")
    )
    return st.one_of(http, st.binary(max_size=200).map(lambda b: b + b"\n"))


def test_hostile_request_heads_under_session_routing_never_hurt_the_master(start_app: StartApp) -> None:
    """``route_by``: the master reads every connection's first request head, from any peer."""
    server = start_app({"APP_WORKERS": "2", "APP_ROUTE_BY": "query:k", "APP_HEADER_TIMEOUT": "0.3"})
    address = server.wait_listening()
    keyed = [reply_of(exchange(address, b"GET /room?k=doc-7 HTTP/1.1\r\n\r\n"))["slot"] for _ in range(4)]
    assert len(set(keyed)) == 1  # one key, one worker
    before = open_fds(server.process.pid)

    @HOSTILE
    @given(_request_heads(), st.lists(st.integers(1, 299), max_size=4, unique=True))
    def run(data: bytes, cuts: list[int]) -> None:
        answer = _send_in_pieces(address, data, sorted(cut for cut in cuts if cut < len(data)))
        # Answered by a worker, whatever the head; a head cut short by the client's own close is closed, as a
        # server alone would.
        assert reply_of(answer)["pid"] > 0 if answer else not data.endswith(b"\r\n\r\n")
        assert server.process.poll() is None

    run()
    with socket.create_connection(address, timeout=TIMEOUT) as trickled:  # a head one byte at a time
        trickled.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for byte in b"GET /room?k=doc-7 HTTP/1.1\r\n\r\n":
            trickled.sendall(bytes([byte]))
        assert read_reply(trickled)["slot"] == keyed[0]
    with socket.create_connection(address, timeout=TIMEOUT) as never_done:  # no head in time: routed as it is
        never_done.sendall(b"GET /room?k=doc-7 HTTP/1.1\r\n")
        assert read_reply(never_done)["line"] == "GET /room?k=doc-7 HTTP/1.1"
    assert reply_of(exchange(address, b"GET /room?k=doc-7 HTTP/1.1\r\n\r\n"))["slot"] == keyed[0]
    assert server.count("Traceback") + server.count("could not be routed") == 0, server.output
    assert settle_fds(server, before) <= before


def test_hostile_control_frames_from_a_worker_never_hurt_the_master(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_CHANNEL": "1"})
    address = server.wait_listening()
    time.sleep(0.6)
    before = open_fds(server.process.pid)

    frames = st.tuples(
        st.integers(0, 14),  # kinds, known and unknown, either direction
        st.integers(0, 1),  # flags
        st.integers(0, 3),  # declared descriptors
        st.binary(max_size=24),
    ).map(lambda f: HEADER.pack(f[0], f[1], f[2], len(f[3])) + f[3])

    @HOSTILE
    @given(st.lists(frames, min_size=1, max_size=3).map(b"".join), st.integers(0, 2))
    def run(data: bytes, n_fds: int) -> None:
        pids = set(server.worker_pids())
        with contextlib.suppress(OSError):
            command(address, f"raw {data.hex()} {n_fds}")
        assert server.process.poll() is None
        # Whatever became of that worker, the server serves (a killed one is replaced).
        assert wait_until(lambda: _serves(address), TIMEOUT)
        if set(server.worker_pids()) != pids:
            time.sleep(1.0)  # let the replacement count as healthy, so restarts stay immediate

    run()
    assert server.process.poll() is None
    assert settle_fds(server, before) <= before


# --- a worker's counts are believed only up to what it could have ---------------------------


def _frame(kind: FrameKind, count: int) -> bytes:
    payload = pack_count(count)
    return HEADER.pack(kind, 0, 0, len(payload)) + payload


@pytest.mark.parametrize(
    ("frames", "steering"),
    [
        ([_frame(FrameKind.ACCEPTED, 0xFFFFFFFF)] * 3, "kernel"),
        ([_frame(FrameKind.ACCEPTED, 5)], "master"),  # no listener of its own: it accepted nothing
        ([_frame(FrameKind.NO_ROOM, 0xFFFFFFFF)] * 3, "master"),
        ([_frame(FrameKind.NO_ROOM, 0xFFFFFFFF)] * 3, "kernel"),
    ],
)
def test_a_worker_lying_about_its_counts_is_replaced_and_the_stats_stay_true(
    start_app: StartApp, frames: list[bytes], steering: str
) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_CHANNEL": "1", "APP_STEERING": steering})
    address = server.wait_listening()
    with contextlib.suppress(OSError):
        command(address, f"raw {b''.join(frames).hex()}")
    server.wait_for(r"sent an invalid frame .*(ACCEPTED|NO_ROOM)")
    assert wait_until(lambda: _serves(address), TIMEOUT)
    start = len(server.lines)
    server.send_signal(signal.SIGUSR1)
    stats = json.loads(server.wait_for(r"^STATS (.*)$", TIMEOUT, start=start).group(1))
    assert stats["accepted"] < 1000 and stats["live"] < 1000 and stats["lost_no_room"] < 1000, stats


def test_a_worker_saying_ready_again_is_replaced_and_the_hooks_run_once_per_worker(start_app: StartApp) -> None:
    server = start_app({"APP_WORKERS": "2", "APP_CHANNEL": "1"})
    address = server.wait_listening()
    server.wait_for(r"^START 1$")
    slot = request(address, source=CLIENT_IPS[0])["slot"]
    with contextlib.suppress(OSError):
        command(address, f"raw {(_frame(FrameKind.READY, 1) * 50).hex()}", source=CLIENT_IPS[0])
    server.wait_for(r"sent an invalid frame \(READY sent twice\)")
    assert wait_until(lambda: _serves(address), TIMEOUT)
    server.wait_for(rf"worker {slot} started \(pid", TIMEOUT, start=0)
    time.sleep(0.5)
    starts = server.count(rf"^START {slot}$")
    assert starts == 2, f"on_worker_start ran {starts} times for slot {slot}: once per worker process is right"


def test_trickling_metrics_clients_cannot_deny_a_scrape(start_app: StartApp) -> None:
    """The metrics' limit is per scrape: 8 clients sending a byte every 2 s do not keep /stats from answering."""
    port = free_port()
    server = start_app(command=[*CLI, "--metrics", f"127.0.0.1:{port}"], cwd=HERE)
    server.wait_for(LISTENING, TIMEOUT)
    stop = threading.Event()
    trickling = [socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT) for _ in range(8)]

    def trickle() -> None:
        while not stop.wait(2.0):
            for sock in trickling:
                with contextlib.suppress(OSError):
                    sock.send(b"G")

    thread = threading.Thread(target=trickle, daemon=True)
    thread.start()
    try:
        time.sleep(0.7)  # every place taken, for longer than a scrape ever takes
        began = time.monotonic()
        assert wait_until(lambda: _scrape(port, "GET") is not None, 8.0), "a scrape was never answered"
        assert time.monotonic() - began < 2.5, "the scrape waited for the tricklers"
        time.sleep(5.5)  # past the per-scrape deadline: every trickler has been cut off
        for sock in trickling:
            sock.settimeout(0.5)
            with contextlib.suppress(OSError):
                assert sock.recv(100) == b""
    finally:
        stop.set()
        thread.join(5)
        for sock in trickling:
            sock.close()
    assert server.process.poll() is None


# --- a kernel-path worker cannot touch the listener it shares with the master ---------------------


def test_a_worker_cannot_redirect_unstick_or_shut_the_listener_it_shares(start_app: StartApp) -> None:
    """Each call a worker's code could make on its listener is refused, and every client stays where it belongs.

    Before the lock-down: a ``ret 0`` program sent every new client of every slot to one
    worker, a detach unstuck them, and a shutdown from slot 1 killed the master.
    """
    server = start_app({"APP_WORKERS": "3", "APP_STEERING": "kernel"})
    address = server.wait_listening()
    for source in (CLIENT_IPS[0], CLIENT_IPS[5]):  # two workers (two slots) each try every call
        for operation in ("attach", "detach", "shutdown", "connect", "listen", "dup"):
            assert command(address, f"listener {operation}", source=source)["result"] == "EPERM", operation
    for ip in CLIENT_IPS:
        assert request(address, source=ip)["slot"] == expected_slot(ip, 3), ip
    assert server.process.poll() is None
    assert server.stop() == 0


# --- the WSGI worker's protections: slow clients cost a bounded number of threads --------------


@pytest.mark.parametrize("steering", ["kernel", "master"])
def test_slow_clients_cannot_grow_a_wsgi_worker_without_bound(start_app: StartApp, steering: str) -> None:
    pytest.importorskip("gunicorn")
    server = start_app(
        command=[
            sys.executable,
            "-m",
            "sticky_server",
            "apps.cli_apps:wsgi_app",
            "--wsgi",
            "-w",
            "1",
            "-b",
            "127.0.0.1:0",
            "--worker-connections",
            "40",
            "--keep-alive",
            "1.5",
            "--steering",
            steering,
        ],
        cwd=HERE,
    )
    address = ("127.0.0.1", int(server.wait_for(LISTENING, TIMEOUT).group(1)))
    worker = request_pid(address)
    assert worker is not None
    threads_before = len(os.listdir(f"/proc/{worker}/task"))
    slow: list[socket.socket] = []
    try:
        for n in range(400):  # each sends half a request head, then nothing
            sock = socket.create_connection(address, timeout=TIMEOUT, source_address=(CLIENT_IPS[n % 20], 0))
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            slow.append(sock)
        rss_before = rss_kib(worker)
        for _ in range(4):
            time.sleep(0.5)
            threads = len(os.listdir(f"/proc/{worker}/task"))
            assert threads <= threads_before + 40, threads  # max_connections threads at most
        assert rss_kib(worker) - rss_before < 16 * 1024
    finally:
        for sock in slow:
            sock.close()
    # Gone (or cut off at the keep-alive deadline), they leave the worker as it was: a client is answered.
    assert wait_until(lambda: request_pid(address, timeout=3) == worker, 15.0)
    assert server.process.poll() is None


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def request_pid(address: tuple[str, int], timeout: float = TIMEOUT) -> int | None:
    body = _http(address, b"GET /who HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n", timeout, CLIENT_IPS[0])
    return None if body is None else int(json.loads(body)["pid"])
