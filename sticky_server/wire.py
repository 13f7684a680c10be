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
buffer for ancillary data holds several frames' worth, so the kernel truncates
descriptors (``MSG_CTRUNC``, closing those it drops) only when the receiver has no
room for them: its descriptor limit. The reader then gives the frame that declared
them ``LOST_FD`` in their place, so the receiver keeps the ones that came and knows
how many it lost.

Rule 5: only the kinds in ``CARRIES_FDS`` (hand-offs) carry descriptors. A reader
for a peer that sends none closes any it receives and raises ``ProtocolError``, and
no reader keeps more unclaimed descriptors than the frame it is reading declares:
a peer cannot make its reader hold descriptors.

Ownership: an ``Outbox`` owns the descriptors queued in it and closes its copies
once they are sent (the kernel holds them in the message from then on); the receiver
owns every descriptor it receives and must close those it does not hand on
(``FrameReader.close`` does that for the ones no frame claimed).

Rule 4: a frame with descriptors always starts a ``sendmsg`` call, so its
descriptors ride with its own first byte. A receiver that reads any byte of that
call takes them; one that reads none leaves them in its socket's queue. The master
keeps the worker's end of each control socket open for that reason: if the worker
dies, the hand-offs it never read are still in the queue, and ``Outbox.unread_hand_offs``
tells which frames the descriptors read back from it belong to.
"""

from __future__ import annotations

import array
import collections
import contextlib
import enum
import errno
import fcntl
import os
import socket
import struct
import termios
import threading
from collections.abc import Iterable, Sequence
from typing import NamedTuple

from .errors import ProtocolError

__all__ = [
    "CARRIES_FDS",
    "HEADER",
    "LOST_FD",
    "MAX_FDS_PER_FRAME",
    "MAX_PAYLOAD",
    "DropOldestQueue",
    "Frame",
    "FrameKind",
    "FrameReader",
    "Outbox",
    "encode",
    "encode_joined",
    "pack_addressed",
    "pack_ids",
    "read_back",
    "unpack_addressed",
    "unpack_ids",
    "unread_bytes",
]

HEADER = struct.Struct(">BBHI")
MAX_FDS_PER_FRAME = 64
MAX_PAYLOAD = 16 * 1024 * 1024
RECV_BYTES = 256 * 1024
# One sendmsg gathers up to this much, in up to this many frames.
GATHER_BYTES = 256 * 1024
GATHER_FRAMES = 512
# Room for several frames' descriptors in one recvmsg (see rule 3).
ANCILLARY_BYTES = socket.CMSG_SPACE(4 * MAX_FDS_PER_FRAME * array.array("i").itemsize)
# A plain int: the socket module's flag is an IntFlag, whose "&" runs Python code.
_MSG_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
# Plain ints, looked up once: the socket module's constants are IntEnum members.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_FD_SIZE = array.array("i").itemsize
_ID = struct.Struct(">Q")
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


_KINDS = {kind.value: kind for kind in FrameKind}
MASTER_SENDS = frozenset(
    {FrameKind.HANDOFF, FrameKind.HANDOFF_PROXIED, FrameKind.STOP, FrameKind.PING, FrameKind.MESSAGE}
)
WORKER_SENDS = frozenset(
    {FrameKind.READY, FrameKind.PONG, FrameKind.SEND, FrameKind.PUBLISH, FrameKind.CLOSED, FrameKind.NO_ROOM}
)
CARRIES_FDS = frozenset({FrameKind.HANDOFF, FrameKind.HANDOFF_PROXIED})
# In a frame's fds: a descriptor the kernel dropped because the receiver had no room for it (rule 3).
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


def _close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameReader:
    """Incremental decoder for one control socket.

    ``accepted`` is the set of kinds the peer may send; anything else, a payload
    over ``MAX_PAYLOAD``, more than ``MAX_FDS_PER_FRAME`` descriptors, a nonzero
    flags byte, descriptors on a kind outside ``CARRIES_FDS``, descriptors no frame
    declares (rule 5), or a frame whose descriptors are missing raises
    ``ProtocolError``, and the descriptors of the frames not returned are closed.
    After a ``ProtocolError`` the reader is spent: close the connection.
    """

    def __init__(self, accepted: frozenset[FrameKind]) -> None:
        self._accepted = accepted
        # Allowed kinds by their wire value: an int lookup (an enum member hashes in Python code).
        self._kinds = {kind.value: kind for kind in accepted}
        self._carries_fds = frozenset(kind.value for kind in accepted & CARRIES_FDS)
        self._buffer = bytearray()
        self._fds: collections.deque[int] = collections.deque()
        self._truncated = False  # descriptors were dropped by the kernel for the next frame that declares some
        self.lost_fds = 0  # descriptors the kernel dropped, in total

    @property
    def pending_bytes(self) -> int:
        """Bytes received but not yet part of a complete frame."""
        return len(self._buffer)

    def feed(self, data: bytes | memoryview, fds: Sequence[int] = (), truncated: bool = False) -> list[Frame]:
        """Take bytes and descriptors in arrival order; return the frames now complete.

        ``truncated``: the kernel dropped descriptors sent with these bytes (rule 3).
        """
        if fds or truncated:
            if not self._carries_fds:
                _close_all(fds)
                raise ProtocolError(f"{len(fds)} descriptor(s) arrived from a peer that may send none")
            self._fds.extend(fds)
            self._truncated = self._truncated or truncated
        try:
            frames = self._take(data)
        except ProtocolError:
            self.close()  # a spent reader holds no descriptor
            raise
        if self._fds and len(self._fds) > self._claimable():
            unclaimed = len(self._fds)
            self.close()
            _close_all(fd for frame in frames for fd in frame.fds)
            raise ProtocolError(f"{unclaimed} descriptor(s) arrived that no frame declares")
        return frames

    def _take(self, data: bytes | memoryview) -> list[Frame]:
        buffer = self._buffer
        if buffer:
            buffer += data
            with memoryview(buffer) as view:
                frames, used = self._frames_in(view)
            del buffer[:used]
        else:
            # The common case: the data starts on a frame boundary, so frames are cut
            # straight out of it and only an incomplete tail is kept.
            with memoryview(data) as view:
                frames, used = self._frames_in(view)
                if used < len(view):
                    buffer += view[used:]
        return frames

    def _claimable(self) -> int:
        """How many descriptors the incomplete frame at the end of the buffer may still claim (rule 5)."""
        buffer = self._buffer
        if len(buffer) >= HEADER.size:
            return int(HEADER.unpack_from(buffer)[2])
        return MAX_FDS_PER_FRAME if buffer else 0

    def _frames_in(self, view: memoryview) -> tuple[list[Frame], int]:
        """The complete frames at the start of ``view``, and how many bytes they take."""
        frames: list[Frame] = []
        offset = 0
        size = len(view)
        header_size = HEADER.size
        unpack_header = HEADER.unpack_from
        kinds = self._kinds
        new_frame = tuple.__new__  # Frame's own __new__ is Python code; this is the same tuple
        try:
            while size - offset >= header_size:
                kind_value, flags, n_fds, length = unpack_header(view, offset)
                kind = kinds.get(kind_value)
                if (
                    kind is None
                    or flags
                    or n_fds > MAX_FDS_PER_FRAME
                    or length > MAX_PAYLOAD
                    or (n_fds and kind_value not in self._carries_fds)
                ):
                    raise self._invalid(kind_value, flags, n_fds, length)
                end = offset + header_size + length
                if size < end:
                    break
                frame_fds = self._claim(n_fds) if n_fds else ()
                payload = view[offset + header_size : end].tobytes() if length else b""
                frames.append(new_frame(Frame, (kind, payload, frame_fds)))
                offset = end
        except ProtocolError:
            _close_all(fd for frame in frames for fd in frame.fds)
            raise
        return frames, offset

    def _claim(self, n_fds: int) -> tuple[int, ...]:
        """The first ``n_fds`` received descriptors, ``LOST_FD`` for those the kernel dropped (rule 3)."""
        fds = self._fds
        if n_fds == len(fds):  # the common case: a frame and its descriptors came together
            frame_fds = tuple(fds)
            fds.clear()
        elif n_fds < len(fds):
            frame_fds = tuple([fds.popleft() for _ in range(n_fds)])
        elif self._truncated:
            lost = n_fds - len(fds)
            frame_fds = (*fds, *([LOST_FD] * lost))
            fds.clear()
            self._truncated = False
            self.lost_fds += lost
        else:
            raise ProtocolError(f"frame declares {n_fds} descriptors but {len(fds)} arrived")
        return frame_fds

    def _invalid(self, kind_value: int, flags: int, n_fds: int, length: int) -> ProtocolError:
        kind = _KINDS.get(kind_value)
        if kind is None:
            return ProtocolError(f"unknown frame kind {kind_value}")
        if kind not in self._accepted:
            return ProtocolError(f"frame kind {kind.name} is not allowed in this direction")
        if flags:
            return ProtocolError(f"frame flags must be 0, got {flags}")
        if n_fds and kind not in CARRIES_FDS:
            return ProtocolError(f"frame kind {kind.name} declares {n_fds} descriptors (it carries none)")
        if n_fds > MAX_FDS_PER_FRAME:
            return ProtocolError(f"frame declares {n_fds} descriptors (at most {MAX_FDS_PER_FRAME})")
        return ProtocolError(f"frame declares a {length} byte payload (at most {MAX_PAYLOAD})")

    def read_from(self, sock: socket.socket) -> tuple[list[Frame], bool]:
        """One ``recvmsg`` on ``sock``; return the completed frames and whether the peer closed.

        On a non-blocking socket with nothing to read, raises ``BlockingIOError``.
        """
        try:
            size, fds, truncated = _receive(sock)
        except ConnectionResetError:
            return [], True
        if not size:
            _close_all(fds)
            return [], True
        with memoryview(_receive_buffer()) as view:
            return self.feed(view[:size], fds, truncated), False

    def close(self) -> None:
        """Close the descriptors that arrived but that no complete frame claimed."""
        _close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


_receive_buffers = threading.local()


def _receive_buffer() -> bytearray:
    """This thread's buffer for ``recvmsg_into``.

    ``recvmsg(RECV_BYTES)`` would allocate a fresh RECV_BYTES object per call, which
    the allocator maps, shrinks and unmaps each time: measured as a tenth of the
    master's CPU under a connection load. Readers on one thread never read at once,
    so they share one buffer (``feed`` copies out what it keeps).
    """
    buffer: bytearray | None = getattr(_receive_buffers, "buffer", None)
    if buffer is None:
        buffer = _receive_buffers.buffer = bytearray(RECV_BYTES)
    return buffer


def _receive(sock: socket.socket, flags: int = 0) -> tuple[int, Sequence[int], bool]:
    """One ``recvmsg`` into this thread's receive buffer: the byte count, the descriptors that came, and
    whether the kernel dropped some (rule 3)."""
    size, ancillary, msg_flags, _ = sock.recvmsg_into([_receive_buffer()], ANCILLARY_BYTES, flags)
    return size, _fds_from_ancillary(ancillary), bool(msg_flags & _MSG_CTRUNC)


def _fds_from_ancillary(ancillary: list[tuple[int, int, bytes]]) -> Sequence[int]:
    fds: array.array[int] = array.array("i")
    for level, kind, data in ancillary:
        if level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return fds


def unread_bytes(sock: socket.socket) -> int:
    """How many bytes wait to be read on ``sock`` (``FIONREAD``; Linux and macOS both have it)."""
    answer = fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0\0\0\0")
    return int(array.array("i", answer)[0])


def read_back(sock: socket.socket) -> tuple[int, list[int]]:
    """Read everything waiting on ``sock`` without blocking it; return the byte count and the descriptors, in order.

    For the master, on the worker's end of a control socket once the worker is gone:
    what it never read (``Outbox.unread_hand_offs`` pairs the two). The caller owns
    the descriptors.
    """
    count = 0
    fds: list[int] = []
    while True:
        try:
            size, received, truncated = _receive(sock, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError, ConnectionResetError):
            return count, fds
        if truncated:
            _close_all([*fds, *received])
            raise ProtocolError("the kernel dropped descriptors read back (is the master at its descriptor limit?)")
        fds += received
        if not size:
            return count, fds
        count += size


def _split_frames(data: bytes) -> list[bytes]:
    """Whole frames laid end to end, one by one (their headers give their lengths)."""
    frames = []
    offset = 0
    while offset < len(data):
        end = offset + HEADER.size + HEADER.unpack_from(data, offset)[3]
        frames.append(data[offset:end])
        offset = end
    return frames


class DropOldestQueue:
    """Byte strings in order, bounded in bytes: ``put`` past the bound drops the oldest, never the newest."""

    __slots__ = ("_items", "size")

    def __init__(self) -> None:
        self._items: collections.deque[bytes] = collections.deque()
        self.size = 0  # bytes held

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: bytes, max_bytes: int) -> int:
        """Add ``item`` last; return how many of the oldest were dropped to keep ``size`` within ``max_bytes``."""
        items = self._items
        items.append(item)
        self.size += len(item)
        dropped = 0
        while self.size > max_bytes and len(items) > 1:
            self.size -= len(items.popleft())
            dropped += 1
        return dropped

    def popleft(self) -> bytes:
        """Remove and return the oldest item (IndexError when empty)."""
        item = self._items.popleft()
        self.size -= len(item)
        return item

    def put_back(self, item: bytes) -> None:
        """Return an item taken but not used to the front."""
        self._items.appendleft(item)
        self.size += len(item)

    def clear(self) -> None:
        self._items.clear()
        self.size = 0


def _decode_whole(data: bytes, fds: tuple[int, ...]) -> Frame:
    """A frame ``encode`` made (trusted: no checks), with its descriptors."""
    return Frame(FrameKind(data[0]), data[HEADER.size :], fds)


class _SentHandOff(NamedTuple):
    """A frame with descriptors that went out: where it starts in the stream, its bytes, its descriptor count."""

    start: int
    frame: bytes
    n_fds: int


class Outbox:
    """Frames waiting to be written to one non-blocking control socket, in two queues.

    Control frames (hand-offs, heartbeats, STOP, a worker's READY) always go
    before messages queued here, so those delay a hand-off by at most the one run
    being written (messages already in the kernel's socket buffer still go first;
    the receiver reads them at once and handles them in slices, so they hold it
    up by about a slice: README, Messages). Messages are bounded: ``put_message``
    drops the oldest queued ones beyond ``max_bytes`` and says how many. Order
    within each queue is kept. Consecutive frames go out in one ``sendmsg``; a
    frame's descriptors ride with the call that sends its first byte (rule 1).

    Descriptors queued here are owned here: each is closed once the ``sendmsg``
    that carries it succeeds (the message holds it from then on), and ``clear``
    gives back those not sent yet. Frames with descriptors that went out are
    remembered until ``forget_read`` learns that the peer read them whole, so that
    ``unread_hand_offs`` can tell, after the peer is gone, which ones it never read
    (module docstring, rule 4).
    """

    def __init__(self) -> None:
        self._control: collections.deque[tuple[bytes, tuple[int, ...]]] = collections.deque()
        self._messages = DropOldestQueue()
        self._current: memoryview | None = None  # the rest of a frame partly written
        self._current_is_message = False
        self.queued_fds = 0  # descriptors in frames not sent yet
        self.sent_fds = 0  # descriptors sent, in total
        self.written = 0  # bytes written, in total: the stream offset of the next byte
        self.sent_hand_offs: collections.deque[_SentHandOff] = collections.deque()
        self.unconfirmed_fds = 0  # descriptors in sent_hand_offs: sent, not known to be read

    def __len__(self) -> int:
        return len(self._control) + len(self._messages) + (self._current is not None)

    @property
    def message_bytes(self) -> int:
        """Bytes of messages queued (not counting one partly written)."""
        return self._messages.size

    def put(self, kind: FrameKind, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """Queue one control frame; the outbox owns ``fds`` from now on."""
        self._control.append((encode(kind, payload, len(fds)), tuple(fds)))
        self.queued_fds += len(fds)

    def put_message(self, kind: FrameKind, payload: bytes, max_bytes: int) -> int:
        """Queue one message frame; return how many older messages were dropped to stay under ``max_bytes``."""
        return self.put_message_frame(encode(kind, payload), max_bytes)

    def put_message_frame(self, frame: bytes, max_bytes: int) -> int:
        """``put_message`` for a frame already encoded (one frame can go to many outboxes)."""
        return self._messages.put(frame, max_bytes)

    def clear(self) -> list[Frame]:
        """Forget every queued frame; return the unsent ones with descriptors (the caller owns those now)."""
        unsent = [_decode_whole(data, fds) for data, fds in self._control if fds]
        self._control.clear()
        self._messages.clear()
        self._current = None
        self.queued_fds = 0
        return unsent

    def forget_read(self, unread: int) -> None:
        """Forget the sent frames with descriptors that the peer has read whole.

        ``unread`` is how many of the written bytes the peer has not read yet (the
        ``FIONREAD`` of its end of the socket, see ``unread_bytes``).
        """
        read = self.written - unread
        sent = self.sent_hand_offs
        while sent and sent[0].start + len(sent[0].frame) <= read:
            self.unconfirmed_fds -= sent.popleft().n_fds

    def unread_hand_offs(self, unread: int, fds: Sequence[int]) -> tuple[list[Frame], int]:
        """Once the peer is gone: the sent frames with descriptors it never read, and how many descriptors it took
        with frames it did not read whole (so never handled).

        ``unread`` is the count of bytes read back from the peer's end of the socket,
        ``fds`` the descriptors that came with them, in order: by rule 4 they are
        exactly those of the frames that start at or after the first unread byte.
        Raises ``ProtocolError`` (the caller owns ``fds`` still) if the count does not
        match.
        """
        read = self.written - unread
        unread_frames = [sent for sent in self.sent_hand_offs if sent.start >= read]
        taken_partly = sum(
            sent.n_fds for sent in self.sent_hand_offs if sent.start < read < sent.start + len(sent.frame)
        )
        expected = sum(sent.n_fds for sent in unread_frames)
        if expected != len(fds):
            raise ProtocolError(
                f"{len(fds)} descriptors read back for unread hand-offs carrying {expected}; cannot pair them"
            )
        self.sent_hand_offs.clear()
        self.unconfirmed_fds = 0
        frames = []
        offset = 0
        for sent in unread_frames:
            frame_fds = tuple(fds[offset : offset + sent.n_fds])
            offset += sent.n_fds
            frames.append(_decode_whole(sent.frame, frame_fds))
        return frames, taken_partly

    def _next_batch(self) -> tuple[list[memoryview], list[bool], tuple[int, ...]]:
        """Buffers for one sendmsg, which of them are messages, and the first one's descriptors."""
        buffers: list[memoryview] = []
        kinds: list[bool] = []
        fds: tuple[int, ...] = ()
        size = 0
        if self._current is not None:
            buffers.append(self._current)
            kinds.append(self._current_is_message)
            size = len(self._current)
            self._current = None
        elif self._control:
            data, fds = self._control.popleft()
            buffers.append(memoryview(data))
            kinds.append(False)
            size = len(data)
        # Gather what follows: control frames without descriptors first, then messages.
        while self._control and not self._control[0][1] and size < GATHER_BYTES and len(buffers) < GATHER_FRAMES:
            data, _ = self._control.popleft()
            buffers.append(memoryview(data))
            kinds.append(False)
            size += len(data)
        if self._control and buffers:
            return buffers, kinds, fds  # a hand-off is next: it starts the next call
        # A run of messages goes out as one joined buffer: one copy of small frames is
        # cheaper than a memoryview and an iovec each (and _put_back splits it again).
        run: list[bytes] = []
        run_size = 0
        while self._messages and size + run_size < GATHER_BYTES and len(run) < GATHER_FRAMES:
            data = self._messages.popleft()
            run.append(data)
            run_size += len(data)
        if run:
            buffers.append(memoryview(run[0] if len(run) == 1 else b"".join(run)))
            kinds.append(True)
        return buffers, kinds, fds

    def _put_back(self, buffers: list[memoryview], kinds: list[bool], fds: tuple[int, ...]) -> None:
        """Return unwritten whole frames to the front of their queues, in order."""
        for index in range(len(buffers) - 1, -1, -1):
            data = bytes(buffers[index])
            if kinds[index]:
                # Back as the frames it was joined from, so drop-oldest still counts messages.
                for frame in reversed(_split_frames(data)):
                    self._messages.put_back(frame)
            else:
                self._control.appendleft((data, fds if index == 0 else ()))

    def flush(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes; return True when nothing is left.

        Raises ``BrokenPipeError``/``ConnectionResetError`` when the peer is gone.
        """
        while self._current is not None or self._control or self._messages:
            resuming = self._current is not None
            buffers, kinds, fds = self._next_batch()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                sent = sock.sendmsg(buffers, ancillary)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                # macOS reports a full socket buffer during fd passing as ENOBUFS.
                if exc.errno != errno.ENOBUFS:
                    self._put_back(buffers, kinds, fds)
                    raise
                sent = 0
            if sent == 0:
                if resuming:
                    self._current, self._current_is_message = buffers[0], kinds[0]
                    buffers, kinds = buffers[1:], kinds[1:]
                self._put_back(buffers, kinds, fds)
                return False
            if fds:
                # The frame with them is buffers[0] and starts this call (rule 4); the
                # message holds the descriptors now, so this copy goes.
                self.sent_hand_offs.append(_SentHandOff(self.written, bytes(buffers[0]), len(fds)))
                self.sent_fds += len(fds)
                self.unconfirmed_fds += len(fds)
                self.queued_fds -= len(fds)
                for fd in fds:
                    os.close(fd)
            self.written += sent
            for index, buffer in enumerate(buffers):
                if sent >= len(buffer):
                    sent -= len(buffer)
                    continue
                # Partly written: keep its rest for the next call (its descriptors went
                # with its first byte); the frames after it are whole and go back.
                self._current, self._current_is_message = buffer[sent:], kinds[index]
                self._put_back(buffers[index + 1 :], kinds[index + 1 :], ())
                return False
        return True
