"""Frames waiting to go out on one control socket, and the record of the hand-offs that went.

See ``Outbox``; the rules for descriptors are ``wire``'s.
"""

from __future__ import annotations

import array
import collections
import errno
import os
import socket
from collections.abc import Sequence
from typing import NamedTuple

from ..errors import ProtocolError
from .frames import Frame, FrameKind, decode_whole, encode, split_frames

__all__ = ["GATHER_BYTES", "GATHER_FRAMES", "DropOldestQueue", "Outbox"]

# One sendmsg gathers up to this much, in up to this many frames.
GATHER_BYTES = 256 * 1024
GATHER_FRAMES = 512


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


class _SentHandOff(NamedTuple):
    """A frame with descriptors that went out: where it starts in the stream, its bytes, its descriptor count,
    and the caller's tag."""

    start: int
    frame: bytes
    n_fds: int
    tag: object


class Outbox:
    """Frames waiting to be written to one non-blocking control socket, in two queues.

    Control frames (hand-offs, heartbeats, STOP, a worker's READY) always go
    before messages queued here, so those delay a hand-off by at most the one run
    being written (messages already in the kernel's socket buffer still go first;
    the receiver reads them at once and handles them in slices, so they hold it
    up by about a slice: README, Messages). Messages are bounded: ``put_message``
    drops the oldest queued ones beyond ``max_bytes`` and says how many. Order
    within each queue is kept. Consecutive frames go out in one ``sendmsg``; a
    frame's descriptors ride with the call that sends its first byte (master rule 1).

    Descriptors queued here are owned here: each is closed once the ``sendmsg``
    that carries it succeeds (the message holds it from then on), and ``clear``
    gives back those not sent yet. Frames with descriptors that went out are
    remembered until ``forget_read`` learns that the peer read them whole, so that
    ``unread_hand_offs`` can tell, after the peer is gone, which ones it never read
    (``wire``, master rule 4). A frame with descriptors may carry a ``tag`` (what the
    caller knows of them), given back with it by ``clear`` and ``unread_hand_offs``.
    """

    def __init__(self) -> None:
        self._control: collections.deque[tuple[bytes, tuple[int, ...], object]] = collections.deque()
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

    def put(self, kind: FrameKind, payload: bytes = b"", fds: Sequence[int] = (), tag: object = None) -> None:
        """Queue one control frame; the outbox owns ``fds`` from now on."""
        self._control.append((encode(kind, payload, len(fds)), tuple(fds), tag))
        self.queued_fds += len(fds)

    @property
    def queued_messages(self) -> int:
        """How many message frames wait (not yet started on the socket)."""
        return len(self._messages)

    def put_message(self, kind: FrameKind, payload: bytes, max_bytes: int) -> int:
        """Queue one message frame; return how many older messages were dropped to stay under ``max_bytes``."""
        return self.put_message_frame(encode(kind, payload), max_bytes)

    def put_message_frame(self, frame: bytes, max_bytes: int) -> int:
        """``put_message`` for a frame already encoded (one frame can go to many outboxes)."""
        return self._messages.put(frame, max_bytes)

    def clear(self) -> list[tuple[Frame, object]]:
        """Forget every queued frame; return the unsent ones with descriptors and their tags (the caller owns
        the descriptors now)."""
        unsent = [(decode_whole(data, fds), tag) for data, fds, tag in self._control if fds]
        self._control.clear()
        self._messages.clear()
        self._current = None
        self.queued_fds = 0
        return unsent

    def forget_sent(self) -> None:
        """Keep no record of the frames with descriptors sent so far (a sender that never reads back)."""
        self.sent_hand_offs.clear()
        self.unconfirmed_fds = 0

    def forget_read(self, unread: int) -> None:
        """Forget the sent frames with descriptors that the peer has read whole.

        ``unread`` is how many of the written bytes the peer has not read yet (the
        ``FIONREAD`` of its end of the socket, see ``unread_bytes``).
        """
        read = self.written - unread
        sent = self.sent_hand_offs
        while sent and sent[0].start + len(sent[0].frame) <= read:
            self.unconfirmed_fds -= sent.popleft().n_fds

    def unread_hand_offs(self, unread: int, fds: Sequence[int]) -> tuple[list[tuple[Frame, object]], int]:
        """Once the peer is gone: the sent frames with descriptors it never read (with their tags), and how many
        descriptors it took with frames it did not read whole (so never handled).

        ``unread`` is the count of bytes read back from the peer's end of the socket,
        ``fds`` the descriptors that came with them, in order: by master rule 4 they are
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
            frames.append((decode_whole(sent.frame, frame_fds), sent.tag))
        return frames, taken_partly

    def _next_batch(self) -> tuple[list[memoryview], list[bool], tuple[int, ...], object]:
        """Buffers for one sendmsg, which of them are messages, and the first one's descriptors and tag."""
        buffers: list[memoryview] = []
        kinds: list[bool] = []
        fds: tuple[int, ...] = ()
        tag: object = None
        size = 0
        if self._current is not None:
            buffers.append(self._current)
            kinds.append(self._current_is_message)
            size = len(self._current)
            self._current = None
        elif self._control:
            data, fds, tag = self._control.popleft()
            buffers.append(memoryview(data))
            kinds.append(False)
            size = len(data)
        # Gather what follows: control frames without descriptors first, then messages.
        while self._control and not self._control[0][1] and size < GATHER_BYTES and len(buffers) < GATHER_FRAMES:
            data = self._control.popleft()[0]
            buffers.append(memoryview(data))
            kinds.append(False)
            size += len(data)
        if self._control and buffers:
            return buffers, kinds, fds, tag  # a hand-off is next: it starts the next call
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
        return buffers, kinds, fds, tag

    def _put_back(self, buffers: list[memoryview], kinds: list[bool], fds: tuple[int, ...], tag: object) -> None:
        """Return unwritten whole frames to the front of their queues, in order."""
        for index in range(len(buffers) - 1, -1, -1):
            data = bytes(buffers[index])
            if kinds[index]:
                # Back as the frames it was joined from, so drop-oldest still counts messages.
                for frame in reversed(split_frames(data)):
                    self._messages.put_back(frame)
            else:
                self._control.appendleft((data, fds, tag) if index == 0 else (data, (), None))

    def flush(self, sock: socket.socket) -> bool:
        """Write as much as the socket takes; return True when nothing is left.

        Raises ``BrokenPipeError``/``ConnectionResetError`` when the peer is gone.
        """
        while self._current is not None or self._control or self._messages:
            resuming = self._current is not None
            buffers, kinds, fds, tag = self._next_batch()
            ancillary = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))] if fds else []
            try:
                sent = sock.sendmsg(buffers, ancillary)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError as exc:
                # macOS reports a full socket buffer during fd passing as ENOBUFS.
                if exc.errno != errno.ENOBUFS:
                    self._put_back(buffers, kinds, fds, tag)
                    raise
                sent = 0
            if sent == 0:
                if resuming:
                    self._current, self._current_is_message = buffers[0], kinds[0]
                    buffers, kinds = buffers[1:], kinds[1:]
                self._put_back(buffers, kinds, fds, tag)
                return False
            if fds:
                # The frame with them is buffers[0] and starts this call (master rule 4); the
                # message holds the descriptors now, so this copy goes.
                self.sent_hand_offs.append(_SentHandOff(self.written, bytes(buffers[0]), len(fds), tag))
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
                self._put_back(buffers[index + 1 :], kinds[index + 1 :], (), None)
                return False
        return True
