"""Message encoding, limits and envelopes; hostile payloads only ever raise ProtocolError."""

from __future__ import annotations

import contextlib
import json
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sticky_server.errors import ProtocolError
from sticky_server.protocol import messages as channel

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(),
    lambda children: st.lists(children) | st.dictionaries(st.text(), children),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_values_round_trip(value: object) -> None:
    assert channel.decode(channel.encode(value)) == value


@pytest.mark.parametrize("value", [{1, 2}, b"bytes", object(), {"a": float}, {(1, 2): "tuple key"}])
def test_values_that_are_not_json_raise_type_error_naming_what_is_allowed(value: object) -> None:
    with pytest.raises(TypeError, match=r"message cannot be sent: .*Send JSON values: dict"):
        channel.encode(value)


def test_circular_values_raise_type_error() -> None:
    loop: list[object] = []
    loop.append(loop)
    with pytest.raises(TypeError, match="Circular reference"):
        channel.encode(loop)


def test_size_limit_raises_value_error_naming_the_option() -> None:
    assert len(channel.encode("x" * 98, max_size=100)) == 100
    with pytest.raises(ValueError, match=r"101 bytes as JSON, over the 100 byte limit.*max_message_size"):
        channel.encode("x" * 99, max_size=100)


@pytest.mark.parametrize("value", [math.nan, math.inf, [-math.inf]])
def test_nan_and_infinity_are_not_json_and_are_refused_both_ways(value: object) -> None:
    with pytest.raises(TypeError, match="message cannot be sent"):
        channel.encode(value)
    with pytest.raises(ProtocolError, match="not JSON"):
        channel.decode(json.dumps(value).encode())


def test_nesting_too_deep_to_encode_raises_the_documented_type_error() -> None:
    deep: list[object] = []
    for _ in range(100_000):
        deep = [deep]
    with pytest.raises(TypeError, match="nested too deeply"):
        channel.encode(deep)


@pytest.mark.parametrize(
    "payload",
    [
        b"1" * 5000,  # past Python's int-string digit limit: a ValueError from int()
        b"[" * 100_000 + b"]" * 100_000,  # past the recursion limit
        b"\xff\xfe",
    ],
)
def test_decoding_hostile_payloads_raises_only_protocol_error(payload: bytes) -> None:
    with pytest.raises(ProtocolError, match="not valid JSON"):
        channel.decode(payload)


def test_envelopes_round_trip() -> None:
    body = channel.encode({"hello": "wörld"})
    assert channel.unpack_delivery(channel.pack_delivery(None, body)) == (None, {"hello": "wörld"})
    assert channel.unpack_delivery(channel.pack_delivery(7, body)) == (7, {"hello": "wörld"})
    assert channel.unpack_publish(channel.pack_publish(True, body)) == (True, body)
    assert channel.unpack_publish(channel.pack_publish(False, body)) == (False, body)


@pytest.mark.parametrize(
    ("payload", "message"),
    [(b"", "without a valid include-sender flag"), (b"\x02{}", "include-sender"), (b"\x00{", "not valid JSON")],
)
def test_bad_publish_frames_are_protocol_errors(payload: bytes, message: str) -> None:
    with pytest.raises(ProtocolError, match=message):
        channel.unpack_publish(payload)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_payloads_raise_nothing_but_protocol_error(payload: bytes) -> None:
    for parse in (channel.decode, channel.unpack_publish, channel.unpack_delivery):
        with contextlib.suppress(ProtocolError):
            parse(payload)
