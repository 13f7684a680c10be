"""Routing by session, without a master: the key a request head carries, session ids naming slots, bounded loads."""

from __future__ import annotations

import os
import socket
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.errors import ProtocolError
from sticky_server.master.traffic import moved_client
from sticky_server.protocol.frames import pack_routes, unpack_routes
from sticky_server.rendezvous import address_key
from sticky_server.sessions import (
    MAX_KEY_LENGTH,
    UNBOUNDED_ALLOWANCE,
    RouteBy,
    SessionBalancer,
    key_hash,
    new_session_allowance,
    rendezvous_order,
    session_bound,
    session_key,
    sid_with_slot,
    slot_in_sid,
)
from sticky_server.worker.sorting import SessionSorter
from sticky_server.working import arrange_one_request_per_connection

POLL = b"GET /socket.io/?EIO=4&transport=polling&sid=3.AbC-d_e HTTP/1.1\r\nHost: x\r\n\r\n"


@pytest.mark.parametrize(
    ("route", "head", "key"),
    [
        ("engineio", POLL, "3.AbC-d_e"),
        ("engineio", b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\r\n", None),  # a new session
        ("query:room", b"GET /chat?x=1&room=a%20b HTTP/1.1\r\n\r\n", "a b"),
        ("path:2", b"GET /doc/42/edit?x HTTP/1.1\r\n\r\n", "42"),
        ("path:3", b"GET /doc/42 HTTP/1.1\r\n\r\n", None),
        ("cookie:sid", b'GET / HTTP/1.1\r\nCookie: a=1; sid="xyz"; b=2\r\n\r\n', "xyz"),
        ("header:X-Session", b"GET / HTTP/1.1\r\nx-session:  k1 \r\n\r\n", "k1"),
        ("header:x-session", b"GET / HTTP/1.1\r\nX-Other: k1\r\n\r\n", None),
        ("engineio", b"\x16\x03\x01\x02\x00", None),  # a TLS hello: no request
        ("engineio", b"GET /?sid=" + b"a" * (MAX_KEY_LENGTH + 1) + b" HTTP/1.1\r\n\r\n", None),  # too long: no key
    ],
)
def test_the_key_a_request_head_carries(route: str, head: bytes, key: str | None) -> None:
    spec = RouteBy.parse(route)
    assert spec is not None
    assert session_key(head, spec) == key


def test_route_by_is_refused_with_the_fix() -> None:
    assert RouteBy.parse("ip") is None
    for text, says in [
        ("cookies:x", "expected ip, engineio"),
        ("cookie", "needs a name after a colon"),
        ("path:0", "a number from 1 to 64"),
        ("engineio:x", "takes no name"),
    ]:
        with pytest.raises(ValueError, match=says):
            RouteBy.parse(text)


@given(st.binary(max_size=600), st.sampled_from(["engineio", "cookie:s", "header:x-s", "query:q", "path:1"]))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_key_or_none_and_never_raise(head: bytes, route: str) -> None:
    spec = RouteBy.parse(route)
    assert spec is not None
    key = session_key(head, spec)
    assert key is None or 0 < len(key) <= MAX_KEY_LENGTH


@given(st.integers(0, 9999), st.text(min_size=1, max_size=40))
def test_a_session_id_names_its_slot_and_only_such_ids_do(slot: int, base: str) -> None:
    assert slot_in_sid(sid_with_slot(slot, base)) == slot
    assert slot_in_sid(base.replace(".", "")) is None


@pytest.mark.parametrize("sid", ["", ".x", "3.", "x.3", "12345.x", "\u0663.x", "-1.x"])
def test_garbage_session_ids_name_no_slot(sid: str) -> None:
    assert slot_in_sid(sid) is None


def everyone(n: int, loads: list[int] | None = None) -> WorkerSet:
    return WorkerSet(n, tuple(range(n)), loads if loads is not None else [0] * n)


def test_a_known_session_goes_to_the_slot_that_made_it_and_a_gone_one_is_placed_anew() -> None:
    balancer = SessionBalancer(RouteBy("engineio"))
    client = ClientInfo("10.0.0.1", 1, session="2.abc")
    assert balancer.pick(client, everyone(4)) == 2
    without_2 = WorkerSet(4, (0, 1, 3), [0] * 4)
    assert balancer.pick(client, without_2) in (0, 1, 3)
    assert balancer.pick(ClientInfo("10.0.0.1", 1, session="9.abc"), everyone(4)) in range(4)


def test_a_named_key_stays_on_its_slot_and_only_its_own_keys_move() -> None:
    balancer = SessionBalancer(RouteBy("path", "2"))
    keys = [f"doc-{n}" for n in range(400)]
    before = {key: balancer.pick(ClientInfo("10.0.0.1", 1, session=key), everyone(4)) for key in keys}
    assert set(Counter(before.values())) and min(Counter(before.values()).values()) > 60  # spread
    without_1 = WorkerSet(4, (0, 2, 3), [0] * 4)
    after = {key: balancer.pick(ClientInfo("10.0.0.2", 1, session=key), without_1) for key in keys}
    assert all(after[key] == before[key] for key in keys if before[key] != 1)  # the others stay


def test_new_sessions_from_one_address_spread_within_the_bound() -> None:
    balancer = SessionBalancer(RouteBy("engineio"), load_factor=0.25)
    for _ in range(100):
        balancer.pick(ClientInfo("203.0.113.7", 5000), everyone(4))
    assert sum(balancer.sessions.values()) == 100 and max(balancer.sessions.values()) <= 1.25 * 25
    single = IPHashBalancer()
    assert len({single.pick(ClientInfo("203.0.113.7", 5000), everyone(4)) for _ in range(100)}) == 1  # the control
    balancer.kept(0, 10)  # kept by worker 0 itself (kernel path)
    assert balancer.sessions[0] >= 10
    balancer.forget(0)  # a new worker in slot 0: its sessions went with the old one
    assert 0 not in balancer.sessions


def test_a_client_with_its_own_address_lands_where_ip_hash_puts_it() -> None:
    balancer, ip_hash = SessionBalancer(RouteBy("engineio")), IPHashBalancer()
    clients = [ClientInfo(f"198.51.100.{n}", 1) for n in range(200)]
    placed = [balancer.pick(client, everyone(5)) for client in clients]
    first = [ip_hash.pick(client, everyone(5)) for client in clients]
    # Where its first choice is not over the bound; IP hash's own unevenness is what spills.
    assert sum(a == b for a, b in zip(placed, first, strict=True)) >= 0.8 * len(clients)
    assert max(balancer.sessions.values()) <= 1.25 * 200 / 5 + 1


def test_the_first_choice_of_a_new_session_is_ip_hash_s() -> None:
    # ``place`` takes IP hash's (cached) pick as the first slot of the address's rendezvous order.
    ip_hash = IPHashBalancer()
    for count in (2, 3, 5, 8):
        workers = everyone(count)
        for n in range(300):
            host = f"10.{n % 7}.{n // 7}.{n % 251}" if n % 3 else f"2001:db8::{n:x}"
            key = address_key(host, 32, 128)
            assert rendezvous_order(key, workers.alive)[0] == ip_hash.pick(ClientInfo(host, 1), workers)


@settings(max_examples=300, deadline=None)
@given(
    held=st.integers(0, 5000),
    others=st.integers(0, 5000),
    alive=st.integers(1, 9),
    load_factor=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0, 3.0]),
)
def test_an_allowance_never_lets_a_worker_pass_the_bound(
    held: int, others: int, alive: int, load_factor: float
) -> None:
    total = held + others
    allowance = new_session_allowance(held, total, alive, load_factor)
    fits = [held + j < session_bound(total + j, alive, load_factor) for j in range(min(allowance, 20000) + 2)]
    if allowance == UNBOUNDED_ALLOWANCE:
        assert alive <= 1 + load_factor
        return
    assert all(fits[:allowance])  # each one kept in a row stays under the bound, the average rising with it
    assert allowance >= session_bound(total, alive, load_factor) - held  # never less than the room at once
    assert not all(fits)  # and it is the most: two more would pass it


# --- the kernel path: a worker sorts what it accepted ----------------------------------------------


def peer_with(data: bytes) -> tuple[socket.socket, socket.socket]:
    """(the worker's end, the client's end) of a connection whose client sent ``data``."""
    worker_end, client_end = socket.socketpair()
    if data:
        client_end.sendall(data)
    return worker_end, client_end


@pytest.mark.parametrize(
    ("head", "keeps"),
    [
        (b"GET /socket.io/?EIO=4&transport=polling&sid=1.abc HTTP/1.1\r\n\r\n", True),  # its own session
        (b"GET /socket.io/?EIO=4&transport=polling&sid=2.abc HTTP/1.1\r\n\r\n", False),  # another worker's
        (b"GET /socket.io/?EIO=4&transport=polling&sid=7.abc HTTP/1.1\r\n\r\n", True),  # no such slot: here
        (b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n", True),  # a new session: the line is enough
        (b"GET /socket.io/?EIO=4&transp", False),  # the request line is not all there yet
        (b"\x16\x03\x01\x00\x05hello", True),  # no HTTP request: as the kernel chose
        (b"", False),  # nothing yet: the master waits for it
    ],
)
def test_a_worker_keeps_its_own_sessions_and_passes_on_the_rest(head: bytes, keeps: bool) -> None:
    sorter = SessionSorter(RouteBy("engineio"), slot=1, max_head=8192)
    sorter.update(pack_routes(100, [0, 1, 2]))
    worker_end, client_end = peer_with(head)
    with worker_end, client_end:
        assert sorter.keeps(worker_end) is keeps
        assert worker_end.recv(1 << 16, socket.MSG_DONTWAIT | socket.MSG_PEEK) == head if head else True  # unread
    assert sorter.moved == (0 if keeps else 1)


def test_new_sessions_stay_while_the_allowance_lasts_and_are_reported() -> None:
    sorter = SessionSorter(RouteBy("engineio"), slot=0, max_head=8192)
    new = b"GET /socket.io/?EIO=4&transport=polling HTTP/1.1\r\n\r\n"
    worker_end, client_end = peer_with(new)
    with worker_end, client_end:
        assert sorter.keeps(worker_end)  # no word from the master yet: kept
        sorter.update(pack_routes(3, [0, 1]))  # three, less the one kept and not reported yet
        assert sorter.keeps(worker_end) and sorter.keeps(worker_end)
        assert not sorter.keeps(worker_end)  # the allowance is spent: the master places it
    assert sorter.kept_new == 3 and sorter.moved == 1


def test_a_named_key_stays_only_on_its_rendezvous_choice() -> None:
    head = b"GET /doc/42 HTTP/1.1\r\n\r\n"
    choice = rendezvous_order(key_hash("42"), (0, 1, 2, 3))[0]
    for slot in range(4):
        sorter = SessionSorter(RouteBy("path", "2"), slot=slot, max_head=8192)
        sorter.update(pack_routes(100, [0, 1, 2, 3]))
        worker_end, client_end = peer_with(head)
        with worker_end, client_end:
            assert sorter.keeps(worker_end) is (slot == choice)


def test_routes_frames_round_trip_and_garbage_is_a_protocol_error() -> None:
    assert unpack_routes(pack_routes(31, [0, 2, 3])) == (31, frozenset({0, 2, 3}))
    for garbage in (b"", b"\x00\x00\x00", b"\x00\x00\x00\x01\x00"):
        with pytest.raises(ProtocolError):
            unpack_routes(garbage)


def test_a_moved_descriptor_must_be_a_tcp_connection() -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:
        client = socket.create_connection(listener.getsockname())
        accepted, _ = listener.accept()
        with client, accepted:
            family, info = moved_client(accepted.fileno(), [("127.0.0.1", listener.getsockname()[1])])
            assert family == socket.AF_INET and info.host == "127.0.0.1"
    read_end, write_end = os.pipe()
    try:
        with pytest.raises(ProtocolError, match="no socket"):
            moved_client(read_end, [])
    finally:
        os.close(read_end)
        os.close(write_end)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as datagram, pytest.raises(ProtocolError, match="not a TCP"):
        moved_client(datagram.fileno(), [])


def test_a_worker_that_cannot_close_each_response_is_warned_about_once(caplog: pytest.LogCaptureFixture) -> None:
    class Plain:
        def add_connection(self, sock: socket.socket) -> None: ...

    class Closing(Plain):
        def close_each_response(self) -> bool:
            return True

    route = RouteBy("cookie", "sid")
    with caplog.at_level("WARNING", logger="sticky_server.worker"):
        assert arrange_one_request_per_connection(Closing(), route, 0)
        assert not arrange_one_request_per_connection(Plain(), route, 1)  # (slot 0 says it for all)
        assert not caplog.records
        assert not arrange_one_request_per_connection(Plain(), route, 0)
    assert "route_by=cookie:sid: Plain cannot end each HTTP response's connection" in caplog.text
