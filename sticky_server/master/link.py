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
lifecycle, ``supervisor.Supervisor.takes_connections``, decides the rest). The link
owns these conditions: each event is a method that applies it and says whether the
link's routability changed, so the router is told (``Router.changed``) by whoever
applied the event, and nothing else writes them.

| condition | set by | cleared by |
|---|---|---|
| not ``connected`` | ``close`` | never: a new process gets a new link |
| ``full`` (master rule 3) | ``route``: ``MAX_QUEUED`` not taken | ``sent``, ``caught_up``: half that |
| ``no_room`` (master rule 6) | ``route``, ``accepted_itself``: ``max_live``; ``lost_at_limit`` | ``closed``: a tenth |
| ``backed_up`` (master rule 7) | ``look_at_queue``: its listeners' queue grows | ``heard_since_backed_up`` |

(The rules are the master's, ``master.loop``.)
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ..balancer import ClientInfo
from ..errors import ProtocolError
from ..protocol.frames import MAX_FDS_PER_FRAME, WORKER_SENDS, Frame, FrameKind, pack_addressed, pack_ids
from ..protocol.outbox import Outbox
from ..protocol.wire import FrameReader, unread_bytes
from .process import WorkerProcess

__all__ = ["BACKED_UP_QUEUE", "FULL", "MAX_QUEUED", "NO_ROOM", "Link", "Owed", "descriptor_headroom"]

# Master rule 3: a worker with this many connections it has not taken is routed around.
MAX_QUEUED = 1024
# Master rule 7: connections waiting on a slot's listeners at two looks that make it backed up.
BACKED_UP_QUEUE = 128
# What a worker's counts are believed up to: no worker accepts faster than this on any machine,
# plus a burst (a report may cover a whole accept burst after a pause).
MAX_ACCEPT_RATE = 1_000_000  # connections a second
ACCEPT_BURST_SLACK = 65_536

# What took a link out of routing (``Link.route`` and the other events), as bits.
FULL = 1  # master rule 3
NO_ROOM = 2  # master rule 6

Owed = tuple[int, int, ClientInfo]  # (connection id, descriptor, what the balancer was told)


def descriptor_headroom(limit: int) -> int | None:
    """Master rule 6: the live connections a worker with descriptor limit ``limit`` may hold (None: no ceiling).

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
    # frames read from the worker and not yet handled (see Traffic.read)
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
    told_routes: bytes = b""  # route_by on the kernel path: the ROUTES payload it was last sent
    accepts_reported_at: float = 0.0  # when the worker's last ACCEPTED count was taken (or its link made)

    @property
    def takes_connections(self) -> bool:
        return self.connected and not self.full and not self.no_room and not self.backed_up

    @property
    def pid(self) -> int:
        return self.worker.pid

    # --- events: each says whether it changed the link's routability ------------

    def route(self, entry: Owed) -> int:
        """A connection routed here: pending until ``frame_pending``, live until the worker says it closed.

        Returns what took the link out of routing (``NO_ROOM`` at its descriptor
        ceiling, master rule 6; ``FULL`` at ``MAX_QUEUED`` not taken, master rule 3), or 0.
        """
        self.pending.append(entry)
        self.live += 1
        left = 0
        max_live = self.max_live
        if max_live is not None and self.live >= max_live and not self.no_room:
            self.no_room = True
            left = NO_ROOM
        if not self.full and self.unread() >= MAX_QUEUED and self.unread(ask_kernel=True) >= MAX_QUEUED:
            self.full = True
            left |= FULL
        return left

    def sent(self) -> tuple[int, bool]:
        """How many hand-offs went out since the last call (master rule 1: they are the worker's now); True when
        that brought a full link back to half ``MAX_QUEUED`` (master rule 3)."""
        sent = self.outbox.sent_fds - self.taken
        self.taken += sent
        if self.full and self.unread() <= MAX_QUEUED // 2:
            self.full = False
            return sent, True
        return sent, False

    def caught_up(self) -> bool:
        """Master rule 3, looked at while full (a worker says nothing when it reads): True when it is back to half."""
        if self.full and self.connected and self.unread(ask_kernel=True) <= MAX_QUEUED // 2:
            self.full = False
            return True
        return False

    def ready(self, descriptor_limit: int) -> None:
        """The worker said READY with its descriptor limit (0: none known); a second READY is a lie
        (hooks would run again): ProtocolError."""
        if self.said_ready:
            raise ProtocolError("READY sent twice")
        self.said_ready = True
        self.descriptor_limit = descriptor_limit
        self.max_live = descriptor_headroom(descriptor_limit)

    def closed(self, count: int) -> tuple[int, bool]:
        """The worker reported ``count`` connections closed: how many of them were counted live, and True
        when that gave it room again (master rule 6: a tenth of its ceiling closed)."""
        count = min(count, self.live)
        self.live -= count
        if self.no_room and self.has_room_again():
            self.no_room = False
            return count, True
        return count, False

    def lost_at_limit(self, lost: int) -> tuple[int, int]:
        """NO_ROOM ``lost``: the kernel closed hand-offs the worker had no descriptor for (master rule 6).

        Its ceiling becomes what it holds now. Returns how many were counted live,
        and ``NO_ROOM`` when that takes it out of routing (else 0). More than it was
        given is a lie: ProtocolError.
        """
        if lost > self.live:
            raise ProtocolError(f"NO_ROOM {lost} is more connections than the worker holds ({self.live})")
        counted, _ = self.closed(lost)
        held = max(1, self.live - self.unread(ask_kernel=True))
        if self.max_live is None or held < self.max_live:
            self.max_live = held
        if self.live >= self.max_live and not self.no_room:
            self.no_room = True
            return counted, NO_ROOM
        return counted, 0

    def accepted_itself(self, count: int, now: float) -> int:
        """Kernel path: the worker accepted ``count`` from its own listener (they count as handed off and
        live); ``NO_ROOM`` when that reaches its ceiling. More than it could have is a lie: ProtocolError."""
        believable = ACCEPT_BURST_SLACK + MAX_ACCEPT_RATE * max(0.0, now - self.accepts_reported_at)
        if count > believable:
            raise ProtocolError(f"ACCEPTED {count} is more than a worker can accept in the time since its last report")
        self.accepts_reported_at = now
        self.accepted += count
        self.live += count
        if self.at_ceiling() and not self.no_room:
            self.no_room = True
            return NO_ROOM
        return 0

    def due_for_recycling(self) -> bool:
        """True once, when it has taken ``recycle_after`` connections (max_connections_per_worker)."""
        if self.recycle_after is None or self.recycling or self.taken + self.accepted < self.recycle_after:
            return False
        self.recycling = True
        return True

    def look_at_queue(self, length: int, now: float) -> bool:
        """Master rule 7: ``length`` connections wait on its listeners now; True when that makes it backed up.

        Backed up: ``BACKED_UP_QUEUE`` or more at two looks, and no fewer at the second.
        """
        seen, self.queue_seen = self.queue_seen, length
        if seen >= BACKED_UP_QUEUE and length >= seen:
            self.backed_up, self.backed_up_at = True, now
            return True
        return False

    def heard_since_backed_up(self) -> bool:
        """Master rule 7: a backed-up worker heard from since takes its clients again; True when it does now."""
        if self.backed_up and self.last_heard > self.backed_up_at:
            self.backed_up = False
            self.queue_seen = 0
            return True
        return False

    # --- what it owes ------------------------------------------------------------

    def gave_back(self, count: int) -> None:
        """``count`` connections it owed went back to the router to be routed again (master rule 2): not live here."""
        self.live = max(0, self.live - count)

    def unread(self, ask_kernel: bool = False) -> int:
        """Connections routed here that the worker has not read, at most (exactly just after ``ask_kernel``)."""
        outbox = self.outbox
        if ask_kernel and self.worker.worker_end is not None and outbox.sent_hand_offs:
            outbox.forget_read(unread_bytes(self.worker.worker_end))
        return len(self.pending) + outbox.queued_fds + outbox.unconfirmed_fds

    def at_ceiling(self) -> bool:
        return self.max_live is not None and self.live >= self.max_live

    def has_room_again(self) -> bool:
        """A tenth of the ceiling closed since it was reached (master rule 6)."""
        return self.max_live is not None and self.live <= self.max_live - max(1, self.max_live // 10)

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

    def close(self) -> list[Owed]:
        """Close the master's end; return every connection owed that was not sent (master rule 2), in order."""
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
