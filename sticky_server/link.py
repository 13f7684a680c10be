"""The master's link to one worker process: its socket traffic, and every connection it owes.

A link owns the master's end of the worker's control socket, the reader of what
the worker sends and the outbox of what goes to it. It keeps a record of each
connection routed to the worker and not yet in the worker's hands: the ones still
pending (routed during this pass of the loop), and those in hand-off frames, queued
or sent but maybe not read (``Outbox`` keeps the entries each frame was made from
as its tag). Closing the link gives them all back, with the ``ClientInfo`` the
balancer was told, so the master can route them again without asking their sockets.

Counters, one meaning each:

| counter | what it counts |
|---|---|
| ``live`` | connections routed here and not reported closed by the worker (``WorkerSet.connections``) |
| ``taken`` | connections whose hand-off went out (``outbox.sent_fds``, seen at the last ``count_sent``) |
| ``accepted`` | connections the worker accepted from its own listener (kernel path), as it reported them |
| ``unread()`` | pending + queued + sent-but-maybe-unread: what the worker has not taken yet, at most |

Whether the link takes new connections is ``takes_connections`` (the worker's
lifecycle, ``supervisor.Supervisor.takes_connections``, decides the rest):

| condition | set when | cleared when |
|---|---|---|
| not ``connected`` | the control socket closed or broke | never: a new process gets a new link |
| ``full`` | ``unread()`` reached ``MAX_QUEUED`` (rule 3) | it is back to half that |
| ``no_room`` | ``live`` reached ``max_live``, its descriptor ceiling (rule 6) | a tenth of the ceiling closed |
| ``backed_up`` | kernel path: connections pile up on its listener (rule 7) | the worker is heard from again |
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .balancer import ClientInfo
from .errors import ProtocolError
from .frames import MAX_FDS_PER_FRAME, WORKER_SENDS, Frame, FrameKind, pack_addressed, pack_ids
from .outbox import Outbox
from .process import WorkerProcess
from .wire import FrameReader, unread_bytes

__all__ = ["BACKED_UP_QUEUE", "MAX_QUEUED", "Link", "Owed", "descriptor_headroom"]

# Rule 3: a worker with this many connections it has not taken is routed around.
MAX_QUEUED = 1024
# Rule 7: connections waiting on a slot's listeners at two looks that make it backed up.
BACKED_UP_QUEUE = 128
# What a worker's counts are believed up to: no worker accepts faster than this on any machine,
# plus a burst (a report may cover a whole accept burst after a pause).
MAX_ACCEPT_RATE = 1_000_000  # connections a second
ACCEPT_BURST_SLACK = 65_536

Owed = tuple[int, int, ClientInfo]  # (connection id, descriptor, what the balancer was told)


def descriptor_headroom(limit: int) -> int | None:
    """Rule 6: the live connections a worker with descriptor limit ``limit`` may hold (None: no ceiling).

    The rest is left for what the worker's own code opens (files, outgoing
    connections, its event loop): an eighth of the limit, at least 32.
    """
    if limit <= 0:
        return None
    return max(1, limit - max(32, limit // 8))


@dataclass(eq=False, slots=True)
class Link:
    """One worker process's link (module docstring)."""

    worker: WorkerProcess
    last_heard: float
    recycle_after: int | None = None
    reader: FrameReader = field(default_factory=lambda: FrameReader(WORKER_SENDS))
    outbox: Outbox = field(default_factory=Outbox)
    # routed here during this pass of the loop, not yet in a frame
    pending: list[Owed] = field(default_factory=list)
    # frames read from the worker and not yet handled (see Dispatcher._handle_frames)
    unhandled: deque[Frame] = field(default_factory=deque)
    taken: int = 0
    accepted: int = 0
    live: int = 0
    max_live: int | None = None
    descriptor_limit: int = 0  # as the worker told it (0: none known)
    connected: bool = True
    no_room: bool = False
    full: bool = False
    backed_up: bool = False
    backed_up_at: float = 0.0  # when it was found backed up
    queue_seen: int = 0  # its listeners' queue length at the last look (kernel path)
    writing: bool = False
    recycling: bool = False
    said_ready: bool = False
    accepts_reported_at: float = 0.0  # when the worker's last ACCEPTED count was taken (or its link made)

    @property
    def takes_connections(self) -> bool:
        return self.connected and not self.full and not self.no_room and not self.backed_up

    def owe(self, entry: Owed) -> None:
        """A connection routed here: pending until ``frame_pending``, live until the worker says it closed."""
        self.pending.append(entry)
        self.live += 1

    def unread(self, ask_kernel: bool = False) -> int:
        """Connections routed here that the worker has not read, at most (exactly just after ``ask_kernel``)."""
        outbox = self.outbox
        if ask_kernel and self.worker.worker_end is not None and outbox.sent_hand_offs:
            outbox.forget_read(unread_bytes(self.worker.worker_end))
        return len(self.pending) + outbox.queued_fds + outbox.unconfirmed_fds

    @property
    def pid(self) -> int:
        return self.worker.pid

    def look_at_queue(self, length: int, now: float) -> bool:
        """Rule 7: ``length`` connections wait on its listeners now; True when that makes it backed up.

        Backed up: ``BACKED_UP_QUEUE`` or more at two looks, and no fewer at the second.
        """
        seen, self.queue_seen = self.queue_seen, length
        if seen >= BACKED_UP_QUEUE and length >= seen:
            self.backed_up, self.backed_up_at = True, now
            return True
        return False

    def heard_since_backed_up(self) -> bool:
        """Rule 7: a backed-up worker heard from since takes its clients again; True when it does now."""
        if self.backed_up and self.last_heard > self.backed_up_at:
            self.backed_up = False
            self.queue_seen = 0
            return True
        return False

    def ready(self) -> None:
        """The worker said READY; a second time is a lie (hooks would run again): ProtocolError."""
        if self.said_ready:
            raise ProtocolError("READY sent twice")
        self.said_ready = True

    def take_accepted(self, count: int, now: float) -> None:
        """Kernel path: the worker accepted ``count`` from its own listener; more than it could have is a lie."""
        believable = ACCEPT_BURST_SLACK + MAX_ACCEPT_RATE * max(0.0, now - self.accepts_reported_at)
        if count > believable:
            raise ProtocolError(f"ACCEPTED {count} is more than a worker can accept in the time since its last report")
        self.accepts_reported_at = now
        self.accepted += count
        self.live += count

    def check_lost(self, count: int) -> None:
        """NO_ROOM ``count``: no more than the connections it was given and holds."""
        if count > self.live:
            raise ProtocolError(f"NO_ROOM {count} is more connections than the worker holds ({self.live})")

    def at_ceiling(self) -> bool:
        return self.max_live is not None and self.live >= self.max_live

    def has_room_again(self) -> bool:
        """A tenth of the ceiling closed since it was reached (rule 6)."""
        return self.max_live is not None and self.live <= self.max_live - max(1, self.max_live // 10)

    def closed(self, count: int) -> int:
        """The worker reported ``count`` connections closed; return how many of them were counted live."""
        count = min(count, self.live)
        self.live -= count
        return count

    def frame_pending(self, addressed: bool, unpackable: Callable[[Owed, BaseException], None]) -> None:
        """Put the pending connections into hand-off frames, in order (with their addresses when ``addressed``).

        A client address that does not pack is that connection's fault alone: it is
        no longer owed here, and ``unpackable`` gets it (to close it and say so).
        """
        pending = self.pending
        for start in range(0, len(pending), MAX_FDS_PER_FRAME):
            batch = pending[start : start + MAX_FDS_PER_FRAME]  # a new list: the frame's tag
            if not addressed:
                self.outbox.put(FrameKind.HANDOFF, pack_ids([entry[0] for entry in batch]), _fds(batch), batch)
                continue
            # The worker's server cannot see the real client address: it travels with the fd.
            try:
                payload = pack_addressed([entry[0] for entry in batch], [entry[2][:2] for entry in batch])
            except (ValueError, OverflowError, struct.error):
                batch = [entry for entry in batch if self._packs(entry, unpackable)]
                payload = pack_addressed([entry[0] for entry in batch], [entry[2][:2] for entry in batch])
            if batch:
                self.outbox.put(FrameKind.HANDOFF_PROXIED, payload, _fds(batch), batch)
        pending.clear()

    def _packs(self, entry: Owed, unpackable: Callable[[Owed, BaseException], None]) -> bool:
        try:
            pack_addressed([entry[0]], [entry[2][:2]])
        except (ValueError, OverflowError, struct.error) as exc:
            self.live -= 1
            unpackable(entry, exc)
            return False
        return True

    def count_sent(self) -> int:
        """How many hand-offs went out since the last call (rule 1: they are the worker's now)."""
        sent = self.outbox.sent_fds - self.taken
        self.taken += sent
        return sent

    def close(self) -> list[Owed]:
        """Close the master's end; return every connection owed that was not sent (rule 2), in order."""
        self.connected = False
        self.worker.control.close()
        self.reader.close()
        owed = owed_in(self.outbox.clear()) + self.pending  # oldest first
        self.pending = []
        self.unhandled.clear()
        return owed


def _fds(batch: list[Owed]) -> list[int]:
    return [entry[1] for entry in batch]


def owed_in(frames: list[tuple[Frame, object]]) -> list[Owed]:
    """The connections in hand-off frames given back by the outbox: each frame's tag is the entries it was
    made from; the descriptors are the frame's own (read back, they have new numbers)."""
    owed: list[Owed] = []
    for frame, tag in frames:
        assert isinstance(tag, list) and len(tag) == len(frame.fds), "a hand-off frame without its tag"
        owed += [(entry[0], fd, entry[2]) for entry, fd in zip(tag, frame.fds, strict=True)]
    return owed
