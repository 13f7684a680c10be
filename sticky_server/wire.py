"""The control-socket frame format and file-descriptor passing.

Theory of operation
-------------------
Each worker shares one ``AF_UNIX`` ``SOCK_STREAM`` socketpair with the master. A
stream socket is the one Unix socket type that Linux and macOS both offer as a
socketpair without a small message-size cap (macOS has no ``SOCK_SEQPACKET`` and
limits datagrams to 2 KiB by default), so message boundaries come from framing::

    +--------+--------+----------+------------+-------------------+
    | kind   | flags  | fd count | length     | payload           |
    | u8     | u8 (0) | u16 BE   | u32 BE     | `length` bytes    |
    +--------+--------+----------+------------+-------------------+

Rule 1: the descriptors of a frame travel as ``SCM_RIGHTS`` ancillary data on the
``sendmsg`` call that sends the frame's first byte. The kernel never delivers
ancillary data after the bytes it was sent with; it may deliver it together with
bytes of an earlier frame.

Rule 2: so the receiver keeps one FIFO of received descriptors, and a complete
frame that declares ``n`` descriptors takes the first ``n`` of it. A frame whose
descriptors have not arrived is a protocol error.

Rule 3: a frame carries at most ``MAX_FDS_PER_FRAME`` descriptors and the receive
buffer for ancillary data holds several frames' worth, so the kernel never has to
truncate (and silently close) descriptors. If it ever does, the reader says so.

Ownership: the sender keeps ownership of the descriptors it sends (the kernel
duplicates them into the message); the receiver owns every descriptor it receives
and must close those it does not hand on (``FrameReader.close`` does that for the
ones no frame claimed).
"""

from __future__ import annotations

import array
import collections
import contextlib
import enum
import errno
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from .errors import ProtocolError

__all__ = [
    "HEADER",
    "MAX_FDS_PER_FRAME",
    "MAX_PAYLOAD",
    "Frame",
    "FrameKind",
    "FrameReader",
    "Outbox",
    "encode",
    "pack_ids",
    "unpack_ids",
]

HEADER = struct.Struct(">BBHI")
MAX_FDS_PER_FRAME = 64
MAX_PAYLOAD = 16 * 1024 * 1024
RECV_BYTES = 256 * 1024
# Room for several frames' descriptors in one recvmsg (see rule 3).
ANCILLARY_BYTES = socket.CMSG_SPACE(4 * MAX_FDS_PER_FRAME * array.array("i").itemsize)
_ID = struct.Struct(">Q")


class FrameKind(enum.IntEnum):
    """What a frame means. Direction is fixed per kind (see MASTER_SENDS/WORKER_SENDS)."""

    HANDOFF = 1  # master -> worker: fds; payload: one u64 connection id per fd
    ACK = 2  # worker -> master: payload: u64 ids of connections the worker now owns
    READY = 3  # worker -> master: work() validated the worker; hand-offs are read now
    STOP = 4  # master -> worker: finish what you have and exit
    PING = 5  # master -> worker: heartbeat; answer with PONG
    PONG = 6  # worker -> master: heartbeat answer


MASTER_SENDS = frozenset({FrameKind.HANDOFF, FrameKind.STOP, FrameKind.PING})
WORKER_SENDS = frozenset({FrameKind.ACK, FrameKind.READY, FrameKind.PONG})


@dataclass(frozen=True, slots=True)
class Frame:
    """One decoded frame; the receiver owns ``fds``."""

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


def pack_ids(ids: Sequence[int]) -> bytes:
    """Pack connection ids as big-endian u64s."""
    return struct.pack(f">{len(ids)}Q", *ids)


def unpack_ids(payload: bytes) -> tuple[int, ...]:
    """Unpack what ``pack_ids`` packed; a length that is not a multiple of 8 is a protocol error."""
    if len(payload) % _ID.size:
        raise ProtocolError(f"id list of {len(payload)} bytes is not a multiple of {_ID.size}")
    return struct.unpack(f">{len(payload) // _ID.size}Q", payload)


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameReader:
    """Incremental decoder for one control socket.

    ``accepted`` is the set of kinds the peer may send; anything else, a payload
    over ``MAX_PAYLOAD``, more than ``MAX_FDS_PER_FRAME`` descriptors, a nonzero
    flags byte, or a frame whose descriptors are missing raises ``ProtocolError``.
    After a ``ProtocolError`` the reader is spent: close the connection.
    """

    def __init__(self, accepted: frozenset[FrameKind]) -> None:
        self._accepted = accepted
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes, fds: Sequence[int] = ()) -> list[Frame]:
        """Take bytes and descriptors in arrival order; return the frames now complete."""
        self._fds.extend(fds)
        self._buffer += data
        frames: list[Frame] = []
        offset = 0
        buffer = self._buffer
        while len(buffer) - offset >= HEADER.size:
            kind_value, flags, n_fds, length = HEADER.unpack_from(buffer, offset)
            try:
                kind = FrameKind(kind_value)
            except ValueError:
                raise ProtocolError(f"unknown frame kind {kind_value}") from None
            if kind not in self._accepted:
                raise ProtocolError(f"frame kind {kind.name} is not allowed in this direction")
            if flags:
                raise ProtocolError(f"frame flags must be 0, got {flags}")
            if n_fds > MAX_FDS_PER_FRAME:
                raise ProtocolError(f"frame declares {n_fds} descriptors (at most {MAX_FDS_PER_FRAME})")
            if length > MAX_PAYLOAD:
                raise ProtocolError(f"frame declares a {length} byte payload (at most {MAX_PAYLOAD})")
            end = offset + HEADER.size + length
            if len(buffer) < end:
                break
            if n_fds > len(self._fds):
                raise ProtocolError(f"frame declares {n_fds} descriptors but {len(self._fds)} arrived")
            frame_fds = tuple(self._fds.popleft() for _ in range(n_fds))
            frames.append(Frame(kind, bytes(buffer[offset + HEADER.size : end]), frame_fds))
            offset = end
        del buffer[:offset]
        return frames

    def read_from(self, sock: socket.socket) -> tuple[list[Frame], bool]:
        """One ``recvmsg`` on ``sock``; return the completed frames and whether the peer closed.

        On a non-blocking socket with nothing to read, raises ``BlockingIOError``.
        """
        try:
            data, ancillary, msg_flags, _ = sock.recvmsg(RECV_BYTES, ANCILLARY_BYTES)
        except ConnectionResetError:
            return [], True
        fds = _fds_from_ancillary(ancillary)
        if msg_flags & getattr(socket, "MSG_CTRUNC", 0):
            _close_all(fds)
            raise ProtocolError("the kernel truncated passed descriptors (ancillary buffer too small)")
        if not data:
            _close_all(fds)
            return [], True
        return self.feed(data, fds), False

    def close(self) -> None:
        """Close the descriptors that arrived but that no complete frame claimed."""
        _close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


def _fds_from_ancillary(ancillary: list[tuple[int, int, bytes]]) -> list[int]:
    fds: list[int] = []
    for level, kind, data in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            received = array.array("i")
            received.frombytes(data[: len(data) - len(data) % received.itemsize])
            fds.extend(received)
    return fds


class Outbox:
    """Frames waiting to be written to one non-blocking control socket.

    Descriptors queued here are borrowed, not owned: the caller keeps them open
    until the peer acknowledges them (the kernel duplicates them at ``sendmsg``).
    A frame is sent in one or more pieces; its descriptors go with the first.
    """

    def __init__(self) -> None:
        self._frames: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()
        self._sent = 0  # bytes of the first frame already written

    def __len__(self) -> int:
        return len(self._frames)

    def put(self, kind: FrameKind, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Queue one frame."""
        self._frames.append((encode(kind, payload, len(fds)), tuple(fds)))

    def clear(self) -> None:
        """Forget every queued frame (their descriptors stay with their owner)."""
        self._frames.clear()
        self._sent = 0

    def flush(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes; return True when nothing is left.

        Raises ``BrokenPipeError``/``ConnectionResetError`` when the peer is gone.
        """
        frames = self._frames
        while frames:
            data, fds = frames[0]
            if self._sent:
                ancillary = []
                view = memoryview(data)[self._sent :]
            else:
                ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
                view = memoryview(data)
            try:
                sent = sock.sendmsg([view], ancillary)
            except (BlockingIOError, InterruptedError):
                return False
            except OSError as exc:
                # macOS reports a full socket buffer during fd passing as ENOBUFS.
                if exc.errno == errno.ENOBUFS:
                    return False
                raise
            if sent < len(view):
                self._sent += sent
                return False
            frames.popleft()
            self._sent = 0
        return True
