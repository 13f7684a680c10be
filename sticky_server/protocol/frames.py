"""The control-socket frame format and every payload codec: bytes in, values out, no I/O.

Each worker shares one ``AF_UNIX`` ``SOCK_STREAM`` socketpair with the master. A
stream socket is the one Unix socket type that Linux and macOS both offer as a
socketpair without a small message-size cap (macOS has no ``SOCK_SEQPACKET`` and
limits datagrams to 2 KiB by default), so message boundaries come from framing::

    +--------+--------+----------+------------+-------------------+
    | kind   | flags  | fd count | length     | payload           |
    | u8     | u8 (0) | u16 BE   | u32 BE     | `length` bytes    |
    +--------+--------+----------+------------+-------------------+

Which side may send which kind is ``MASTER_SENDS`` / ``WORKER_SENDS``; only the
kinds in ``CARRIES_FDS`` carry descriptors (wire rule 5). How descriptors
travel with the bytes is ``wire``'s; the queue that sends frames is ``outbox``'s.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import ProtocolError

__all__ = [
    "CARRIES_FDS",
    "HEADER",
    "ID_BYTES",
    "KIND_BY_VALUE",
    "LOST_FD",
    "MASTER_SENDS",
    "MAX_FDS_PER_FRAME",
    "MAX_HOST_BYTES",
    "MAX_PAYLOAD",
    "WORKER_SENDS",
    "Frame",
    "FrameKind",
    "decode_whole",
    "encode",
    "encode_joined",
    "pack_addressed",
    "pack_count",
    "pack_ids",
    "pack_routes",
    "split_frames",
    "unpack_addressed",
    "unpack_count",
    "unpack_ids",
    "unpack_routes",
]

HEADER = struct.Struct(">BBHI")
MAX_FDS_PER_FRAME = 64
MAX_PAYLOAD = 16 * 1024 * 1024
_ID = struct.Struct(">Q")
ID_BYTES = _ID.size  # one packed connection id
_U32 = struct.Struct(">I")  # the payload of READY, CLOSED, NO_ROOM and ACCEPTED
_COUNT = struct.Struct(">H")
_ADDRESSED = struct.Struct(">QHB")


class FrameKind(enum.IntEnum):
    """What a frame means. Direction is fixed per kind (see MASTER_SENDS/WORKER_SENDS)."""

    HANDOFF = 1  # master -> worker: fds; payload: one u64 connection id per fd
    READY = 3  # worker -> master: hand-offs are read now; payload: u32 descriptor limit (0: none known)
    STOP = 4  # master -> worker: finish what you have and exit
    PING = 5  # master -> worker: heartbeat; answer with PONG
    PONG = 6  # worker -> master: heartbeat answer
    MESSAGE = 7  # master -> worker: a channel message (see channel.py for envelopes)
    SEND = 8  # worker -> master: a channel message for the master
    PUBLISH = 9  # worker -> master: a channel message to relay to every worker
    CLOSED = 10  # worker -> master: payload: u32 count of handed-off connections seen closed
    HANDOFF_PROXIED = 11  # master -> worker: as HANDOFF, plus each client's address (see pack_addressed)
    NO_ROOM = 12  # worker -> master: payload: u32 count of handed-off connections lost at the descriptor limit
    ACCEPTED = 13  # worker -> master: payload: u32 count of connections it accepted from its own listener
    MOVED = 14  # worker -> master: fds it accepted from its own listener that belong elsewhere (route_by)
    ROUTES = 15  # master -> worker: with route_by on the kernel path: its new-session allowance, the alive slots
    SESSIONS = 16  # worker -> master: payload: u32 count of new sessions it kept (route_by, kernel path)


KIND_BY_VALUE = {kind.value: kind for kind in FrameKind}
MASTER_SENDS = frozenset(
    {FrameKind.HANDOFF, FrameKind.HANDOFF_PROXIED, FrameKind.STOP, FrameKind.PING, FrameKind.MESSAGE, FrameKind.ROUTES}
)
WORKER_SENDS = frozenset(
    {
        FrameKind.READY,
        FrameKind.PONG,
        FrameKind.SEND,
        FrameKind.PUBLISH,
        FrameKind.CLOSED,
        FrameKind.NO_ROOM,
        FrameKind.ACCEPTED,
        FrameKind.MOVED,
        FrameKind.SESSIONS,
    }
)
CARRIES_FDS = frozenset({FrameKind.HANDOFF, FrameKind.HANDOFF_PROXIED, FrameKind.MOVED})
# In a frame's fds: a descriptor the kernel dropped because the receiver had no room for it (wire rule 3).
LOST_FD = -1
# A host in an addressed hand-off is at most this many bytes (its length is a u8).
MAX_HOST_BYTES = 255


class Frame(NamedTuple):
    """One decoded frame; the receiver owns ``fds``. (A tuple: the decoder builds one per frame.)"""

    kind: FrameKind
    payload: bytes = b""
    fds: tuple[int, ...] = ()


def encode(kind: FrameKind, payload: bytes = b"", n_fds: int = 0) -> bytes:
    """Return the bytes of one frame (header and payload)."""
    if len(payload) > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {len(payload)} bytes is over the {MAX_PAYLOAD} byte limit")
    if not 0 <= n_fds <= MAX_FDS_PER_FRAME:
        raise ValueError(f"a frame carries 0 to {MAX_FDS_PER_FRAME} descriptors, not {n_fds}")
    return HEADER.pack(kind, 0, n_fds, len(payload)) + payload


def encode_joined(kind: FrameKind, head: bytes, body: bytes) -> bytes:
    """One frame without descriptors whose payload is ``head`` then ``body`` (never joined on their own)."""
    length = len(head) + len(body)
    if length > MAX_PAYLOAD:
        raise ValueError(f"frame payload of {length} bytes is over the {MAX_PAYLOAD} byte limit")
    return HEADER.pack(kind, 0, 0, length) + head + body


def pack_count(count: int) -> bytes:
    """The u32 payload of READY (the worker's descriptor limit), CLOSED, NO_ROOM and ACCEPTED (connections)."""
    return _U32.pack(count)


def unpack_count(frame: Frame) -> int:
    """What ``pack_count`` packed in ``frame``; any other payload is a protocol error."""
    if len(frame.payload) != _U32.size:
        raise ProtocolError(f"{frame.kind.name} frame with a {len(frame.payload)} byte payload ({_U32.size} expected)")
    value: int = _U32.unpack(frame.payload)[0]
    return value


def pack_ids(ids: Sequence[int]) -> bytes:
    """Pack connection ids as big-endian u64s."""
    return struct.pack(f">{len(ids)}Q", *ids)


def unpack_ids(payload: bytes) -> tuple[int, ...]:
    """Unpack what ``pack_ids`` packed; a length that is not a multiple of 8 is a protocol error."""
    if len(payload) % _ID.size:
        raise ProtocolError(f"id list of {len(payload)} bytes is not a multiple of {_ID.size}")
    return struct.unpack(f">{len(payload) // _ID.size}Q", payload)


def pack_addressed(ids: Sequence[int], addresses: Sequence[tuple[str, int]]) -> bytes:
    """Connection ids, each with its client's (host, port): u16 count, then per connection u64 id,
    u16 port, u8 host length, host (ASCII)."""
    parts = [_COUNT.pack(len(ids))]
    for conn_id, (host, port) in zip(ids, addresses, strict=True):
        encoded = host.encode("ascii")  # UnicodeEncodeError (a ValueError) for any other text
        if len(encoded) > MAX_HOST_BYTES:
            raise ValueError(f"client host of {len(encoded)} bytes (at most {MAX_HOST_BYTES})")
        parts.append(_ADDRESSED.pack(conn_id, port, len(encoded)))
        parts.append(encoded)
    return b"".join(parts)


def unpack_addressed(payload: bytes) -> tuple[tuple[int, ...], list[tuple[str, int]]]:
    """Unpack what ``pack_addressed`` packed; anything malformed is a protocol error."""
    try:
        (count,) = _COUNT.unpack_from(payload)
        ids, addresses, offset = [], [], _COUNT.size
        for _ in range(count):
            conn_id, port, length = _ADDRESSED.unpack_from(payload, offset)
            offset += _ADDRESSED.size
            host = payload[offset : offset + length].decode("ascii")
            if len(host) != length:
                raise ValueError("truncated host")
            offset += length
            ids.append(conn_id)
            addresses.append((host, port))
    except (struct.error, ValueError) as exc:
        raise ProtocolError(f"malformed addressed hand-off ({exc})") from None
    if offset != len(payload):
        raise ProtocolError(f"addressed hand-off has {len(payload) - offset} bytes left over")
    return tuple(ids), addresses


def pack_routes(allowance: int, alive: Sequence[int]) -> bytes:
    """ROUTES: u32 how many more new sessions the worker may keep, then each alive slot as u16."""
    return struct.pack(f">I{len(alive)}H", allowance, *alive)


def unpack_routes(payload: bytes) -> tuple[int, frozenset[int]]:
    """What ``pack_routes`` packed; anything malformed is a protocol error."""
    if len(payload) < _U32.size or (len(payload) - _U32.size) % 2:
        raise ProtocolError(f"malformed ROUTES frame ({len(payload)} bytes)")
    values = struct.unpack(f">I{(len(payload) - _U32.size) // 2}H", payload)
    return values[0], frozenset(values[1:])


def split_frames(data: bytes) -> list[bytes]:
    """Whole frames laid end to end, one by one (their headers give their lengths)."""
    frames = []
    offset = 0
    while offset < len(data):
        end = offset + HEADER.size + HEADER.unpack_from(data, offset)[3]
        frames.append(data[offset:end])
        offset = end
    return frames


def decode_whole(data: bytes, fds: tuple[int, ...]) -> Frame:
    """A frame ``encode`` made (trusted: no checks), with its descriptors."""
    return Frame(FrameKind(data[0]), data[HEADER.size :], fds)
