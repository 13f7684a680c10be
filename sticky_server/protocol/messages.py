"""Messages between the master and its workers: encoding, size limits, envelopes.

Messages are JSON values (dicts, lists, str, int, float, bool, None), never
pickles: a worker must not be able to make the master run code. A value that
cannot be encoded (a set, NaN or Infinity, nesting too deep) raises TypeError in
the caller; one over ``max_message_size`` raises ValueError. Bytes that are not a
valid message, from a worker (not UTF-8 JSON, NaN, an integer past Python's digit
limit, nesting too deep, over ``max_message_size``), are a protocol error: the master
kills and replaces that worker.

Envelopes (the payload of the frames in ``frames``):
  SEND     worker -> master   the JSON text
  PUBLISH  worker -> master   u8 include-sender flag, then the JSON text; the
                              master checks it and relays the text unchanged
  MESSAGE  master -> worker   u16 sender (``FROM_MASTER`` or a worker slot), then the JSON text

Routing (not here): a worker's messages go to the master through its
``worker.channel.WorkerChannel``; the master's ``master.messages.MessageRouter``
hands SEND to the master's handlers, relays PUBLISH to every current worker (the
sender too if it asked), and queues the master's own ``send``/``broadcast`` for one
worker or all. Every queue drops its oldest messages past
``MAX_QUEUED_MESSAGE_BYTES`` (logged, throttled) rather than block anyone.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from typing import Any

from ..errors import ProtocolError
from .frames import FrameKind

__all__ = [
    "DEFAULT_MAX_MESSAGE_SIZE",
    "EARLY_FLUSH_BYTES",
    "FROM_MASTER",
    "MAX_QUEUED_MESSAGE_BYTES",
    "decode",
    "encode",
    "pack_delivery",
    "pack_publish",
    "sender_prefix",
    "unpack_delivery",
    "unpack_publish",
]

DEFAULT_MAX_MESSAGE_SIZE = 1024 * 1024
# Messages queued for one receiver beyond this many bytes push out the oldest ones.
MAX_QUEUED_MESSAGE_BYTES = 16 * 1024 * 1024
# Dropped messages are logged at most once per this many seconds.
DROP_LOG_INTERVAL = 10.0
# A worker's messages queued beyond this many bytes are written by the sender's own call.
EARLY_FLUSH_BYTES = 64 * 1024
# Looked up once: on Python 3.11 each FrameKind.NAME runs a Python-level descriptor.
_MESSAGE = FrameKind.MESSAGE
FROM_MASTER = 0xFFFF
_SENDER = struct.Struct(">H")
_encoder = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), check_circular=True, allow_nan=False)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON")


# NaN and Infinity are Python's extension, not JSON: refused both ways.
_decoder = json.JSONDecoder(parse_constant=_not_json)
# What JSONDecoder.raw_decode calls (the C scanner); typeshed does not declare the attribute.
_scan_once: Callable[[str, int], tuple[Any, int]] = _decoder.scan_once  # type: ignore[attr-defined]


def encode(message: Any, max_size: int = DEFAULT_MAX_MESSAGE_SIZE) -> bytes:
    """The JSON bytes of ``message``; TypeError if it is not JSON, ValueError if it is too big."""
    try:
        data = _encoder.encode(message).encode()
    except RecursionError:
        raise TypeError("message cannot be sent: it is nested too deeply to encode as JSON") from None
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"message cannot be sent: {exc}. Send JSON values: dict (str keys), list, str, int, float, bool, None"
        ) from None
    if len(data) > max_size:
        raise ValueError(
            f"message is {len(data)} bytes as JSON, over the {max_size} byte limit; "
            "send less, or raise StickyServer(max_message_size=...)"
        )
    return data


def decode(data: bytes) -> Any:
    """The value of a message's JSON bytes; ProtocolError if they are not JSON."""
    try:
        text = data.decode()
        # What encode() writes has no whitespace around the value, so the C scanner alone
        # reads it (JSONDecoder.decode wraps it in two regex matches and Python calls:
        # 2 us of a small message's 2.5). Anything else takes the full path and its errors.
        try:
            value, end = _scan_once(text, 0)
        except (StopIteration, ValueError):
            end = -1
        if end == len(text):
            return value
        return _decoder.decode(text)
    except (ValueError, RecursionError) as exc:
        # ValueError covers bad UTF-8, bad JSON, NaN/Infinity and integers past
        # Python's digit limit; RecursionError, nesting past the interpreter's.
        raise ProtocolError(f"message is not valid JSON ({str(exc)[:200]})") from None


def sender_prefix(sender: int | None) -> bytes:
    """The start of a MESSAGE payload: who sent it (the JSON text follows)."""
    return _SENDER.pack(FROM_MASTER if sender is None else sender)


def pack_delivery(sender: int | None, body: bytes) -> bytes:
    return sender_prefix(sender) + body


def unpack_delivery(payload: bytes) -> tuple[int | None, Any]:
    if len(payload) < _SENDER.size:
        raise ProtocolError("message frame too short for its sender")
    (sender,) = _SENDER.unpack_from(payload)
    return (None if sender == FROM_MASTER else sender), decode(payload[_SENDER.size :])


def pack_publish(include_sender: bool, body: bytes) -> bytes:
    return bytes([include_sender]) + body


def unpack_publish(payload: bytes) -> tuple[bool, bytes]:
    """The include-sender flag and the JSON text, checked to be a valid message."""
    if not payload or payload[0] > 1:
        raise ProtocolError("publish frame without a valid include-sender flag")
    body = payload[1:]
    decode(body)
    return bool(payload[0]), body
