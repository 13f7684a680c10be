"""Passing file descriptors with the control-socket frames: ``sendmsg``/``recvmsg``, reading, read-back.

Theory of operation
-------------------
The frames are ``frames``'s (a header, then the payload, on a stream socket); the
queue that writes them is ``outbox.Outbox``. The rules:

Wire rule 1: the descriptors of a frame travel as ``SCM_RIGHTS`` ancillary data on the
``sendmsg`` call that sends the frame's first byte. The kernel never delivers
ancillary data after the bytes it was sent with; it may deliver it together with
bytes of an earlier frame.

Wire rule 2: so the receiver keeps one FIFO of received descriptors, and a complete
frame that declares ``n`` descriptors takes the first ``n`` of it. A frame whose
descriptors have not arrived is a protocol error.

Wire rule 3: a frame carries at most ``MAX_FDS_PER_FRAME`` descriptors and the receive
buffer for ancillary data holds several frames' worth, so the kernel truncates
descriptors (``MSG_CTRUNC``, closing those it drops) only when the receiver has no
room for them: its descriptor limit. The reader then gives the frame that declared
them ``LOST_FD`` in their place, so the receiver keeps the ones that came and knows
how many it lost.

Wire rule 5: only the kinds in ``CARRIES_FDS`` (hand-offs) carry descriptors. A reader
for a peer that sends none closes any it receives and raises ``ProtocolError``, and
no reader keeps more unclaimed descriptors than the frame it is reading declares:
a peer cannot make its reader hold descriptors.

Ownership: an ``Outbox`` owns the descriptors queued in it and closes its copies
once they are sent (the kernel holds them in the message from then on); the receiver
owns every descriptor it receives and must close those it does not hand on
(``FrameReader.close`` does that for the ones no frame claimed).

Wire rule 4: a frame with descriptors always starts a ``sendmsg`` call, so its
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
import fcntl
import os
import socket
import termios
import threading
from collections.abc import Iterable, Sequence

from ..errors import ProtocolError
from .frames import CARRIES_FDS, HEADER, KIND_BY_VALUE, LOST_FD, MAX_FDS_PER_FRAME, MAX_PAYLOAD, Frame, FrameKind

__all__ = ["ANCILLARY_BYTES", "FrameReader", "close_all", "read_back", "unread_bytes"]

RECV_BYTES = 256 * 1024
# Room for several frames' descriptors in one recvmsg (see wire rule 3).
ANCILLARY_BYTES = socket.CMSG_SPACE(4 * MAX_FDS_PER_FRAME * array.array("i").itemsize)
# A plain int: the socket module's flag is an IntFlag, whose "&" runs Python code.
_MSG_CTRUNC = int(getattr(socket, "MSG_CTRUNC", 0))
# Plain ints, looked up once: the socket module's constants are IntEnum members.
_SOL_SOCKET = int(socket.SOL_SOCKET)
_SCM_RIGHTS = int(socket.SCM_RIGHTS)
_FD_SIZE = array.array("i").itemsize


def close_all(fds: Iterable[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)


class FrameReader:
    """Incremental decoder for one control socket.

    ``accepted`` is the set of kinds the peer may send; anything else, a payload
    over ``MAX_PAYLOAD``, more than ``MAX_FDS_PER_FRAME`` descriptors, a nonzero
    flags byte, descriptors on a kind outside ``CARRIES_FDS``, descriptors no frame
    declares (wire rule 5), or a frame whose descriptors are missing raises
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

        ``truncated``: the kernel dropped descriptors sent with these bytes (wire rule 3).
        """
        if fds or truncated:
            if not self._carries_fds:
                close_all(fds)
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
            close_all(fd for frame in frames for fd in frame.fds)
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
        """How many descriptors the incomplete frame at the end of the buffer may still claim (wire rule 5)."""
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
            close_all(fd for frame in frames for fd in frame.fds)
            raise
        return frames, offset

    def _claim(self, n_fds: int) -> tuple[int, ...]:
        """The first ``n_fds`` received descriptors, ``LOST_FD`` for those the kernel dropped (wire rule 3)."""
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
        kind = KIND_BY_VALUE.get(kind_value)
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
            close_all(fds)
            return [], True
        with memoryview(_receive_buffer()) as view:
            return self.feed(view[:size], fds, truncated), False

    def close(self) -> None:
        """Close the descriptors that arrived but that no complete frame claimed."""
        close_all(self._fds)
        self._fds.clear()
        self._buffer.clear()


_receive_buffers = threading.local()


def _receive_buffer() -> bytearray:
    """This thread's buffer for ``recvmsg_into``.

    ``recvmsg(RECV_BYTES)`` would allocate a fresh RECV_BYTES object per call, which
    the allocator maps, shrinks and unmaps each time, a real cost in the master's
    loop under a connection load. Readers on one thread never read at once, so they
    share one buffer (``feed`` copies out what it keeps).
    """
    buffer: bytearray | None = getattr(_receive_buffers, "buffer", None)
    if buffer is None:
        buffer = _receive_buffers.buffer = bytearray(RECV_BYTES)
    return buffer


def _receive(sock: socket.socket, flags: int = 0) -> tuple[int, Sequence[int], bool]:
    """One ``recvmsg`` into this thread's receive buffer: the byte count, the descriptors that came, and
    whether the kernel dropped some (wire rule 3)."""
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
            close_all([*fds, *received])
            raise ProtocolError("the kernel dropped descriptors read back (is the master at its descriptor limit?)")
        fds += received
        if not size:
            return count, fds
        count += size
