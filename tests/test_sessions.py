"""Routing by session, without a master: the key a request head carries, session ids naming slots, bounded loads."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sticky_server.balancer import ClientInfo, IPHashBalancer, WorkerSet
from sticky_server.sessions import (
    MAX_KEY_LENGTH,
    RouteBy,
    SessionBalancer,
    session_key,
    sid_with_slot,
    slot_in_sid,
)

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
    loads = [0, 0, 0, 0]
    for _ in range(100):
        slot = balancer.pick(ClientInfo("203.0.113.7", 5000), everyone(4, loads))
        loads[slot] += 1
    assert max(loads) <= 1.25 * 25  # IP hash alone: all 100 on one worker
    single = IPHashBalancer()
    assert len({single.pick(ClientInfo("203.0.113.7", 5000), everyone(4)) for _ in range(100)}) == 1


def test_a_client_with_its_own_address_lands_where_ip_hash_puts_it() -> None:
    balancer, ip_hash = SessionBalancer(RouteBy("engineio")), IPHashBalancer()
    for n in range(200):
        client = ClientInfo(f"198.51.100.{n}", 1)
        assert balancer.pick(client, everyone(5)) == ip_hash.pick(client, everyone(5))
