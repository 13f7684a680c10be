"""The workers' control sockets, as the master's loop drives them: reading and handling frames, writing, closing.

Each live worker process has a link (``link.Link``), kept by the router. This part
registers the link's control socket with the loop's selector, reads what the worker
sends and handles it a slice at a time (``slices.SLICE_SECONDS``: a worker that sends
thousands of small messages in one read delays accepts and other workers' frames
by a slice, not by the whole read), writes what is queued for it once per pass of
the loop (one HANDOFF frame per worker per pass, master rule 1), and closes it.

A frame is an event of the link's (``Link.ready``, ``closed``, ``lost_at_limit``,
``accepted_itself``, ``sent``); when one changes whether the worker takes
connections, the router is told. What the supervisor decides about a worker
(READY, a worker due for recycling) is returned to the loop (``take_decisions``),
never carried out here.

Master rule 2 (no loss) lives here: closing a link parks every connection it owed
and had not sent, and a gone worker's end of its control socket is read back
(``read_back``): hand-offs the worker never read are parked too, to be routed again.
An invalid frame from a worker, or an error while handling one, kills that worker.
"""

from __future__ import annotations

import functools
import logging
import os
import random
import selectors
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..balancer import ClientInfo
from ..errors import ProtocolError
from ..protocol.frames import LOST_FD, WORKER_SENDS, Frame, FrameKind, unpack_count
from ..protocol.wire import FrameReader, read_back
from ..sessions import SessionBalancer
from ..util.slices import SLICE_SECONDS, run_for
from .decisions import Decision
from .hooks import Hooks, run_hooks
from .link import Link, Owed, owed_in
from .messages import MessageRouter
from .process import WorkerProcess
from .router import Router
from .stats import SlotCounters
from .supervisor import Supervisor

__all__ = ["FULL_CHECK_INTERVAL", "MAX_DRAIN_READS", "Traffic", "client_of"]

logger = logging.getLogger("sticky_server.master")

# How often the master looks whether a full worker has caught up (it says nothing when it reads).
FULL_CHECK_INTERVAL = 0.05
# How many reads of a dead worker's socket at most (each reads up to 256 KiB).
MAX_DRAIN_READS = 64
# A worker keeps no more new sessions than its allowance between two reports; this is far past any allowance.
MAX_SESSIONS_REPORT = 1 << 24
# max_connections_per_worker is raised by up to this fraction, per worker, at random,
# so that workers started together are not all recycled at once.
RECYCLE_JITTER = 0.1


def client_of(fd: int, listening: Sequence[tuple[str, int]]) -> ClientInfo:
    """A connection's client, asked of its socket (for descriptors read back that no frame accounts for)."""
    sock = socket.socket(fileno=fd)
    try:
        peer: Any = sock.getpeername()
        own: Any = sock.getsockname()
    except OSError:  # the client is gone already: whoever gets it sees it closed
        return ClientInfo("", 0)
    finally:
        sock.detach()
    own_port = own[1] if isinstance(own, tuple) else own
    local = next((name for name in listening if name[1] == own_port or name[0] == own_port), None)
    if isinstance(peer, tuple):
        return ClientInfo(peer[0], peer[1], None, local)
    return ClientInfo("", 0, None, local)


def moved_client(fd: int, listening: Sequence[tuple[str, int]]) -> tuple[int, ClientInfo]:
    """The family and client of a connection a worker moved; family 0 when the client has left already.

    A descriptor that is no TCP stream socket is a worker's lie: ProtocolError.
    """
    try:
        sock = socket.socket(fileno=fd)
    except OSError:
        raise ProtocolError("MOVED a descriptor that is no socket") from None
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ProtocolError(f"MOVED a {sock.family.name} {sock.type.name} socket, not a TCP connection")
        family = int(sock.family)
    finally:
        sock.detach()
    client = client_of(fd, listening)
    return (family if client.host else 0), client


def never_read(link: Link, listening: Sequence[tuple[str, int]]) -> list[Owed]:
    """Master rule 2: the hand-offs a gone worker never read, read back from the master's copy of its end of
    the control socket (closed here), with what the balancer was told of each."""
    worker_end, link.worker.worker_end = link.worker.worker_end, None
    if worker_end is None:
        return []
    slot, pid = link.worker.slot, link.worker.pid
    try:
        unread, fds = read_back(worker_end)
    except ProtocolError as exc:
        logger.error("worker %d (pid %d): %s; its unread connections are lost", slot, pid, exc)
        return []
    finally:
        worker_end.close()
    try:
        frames, lost = link.outbox.unread_hand_offs(unread, fds)
    except ProtocolError as exc:
        logger.error("worker %d (pid %d): %s; routing them by their own addresses", slot, pid, exc)
        return [(0, fd, client_of(fd, listening)) for fd in fds]
    if lost:
        logger.warning(
            "worker %d (pid %d) died while reading a hand-off; its %d connection(s) are lost", slot, pid, lost
        )
    return owed_in(frames)


class Traffic:
    """Reads, handles and writes the workers' control sockets (module docstring). Call on the loop's thread."""

    def __init__(
        self,
        selector: selectors.BaseSelector,
        supervisor: Supervisor,
        router: Router,
        *,
        hooks: Hooks,
        listening: Sequence[tuple[str, int]],
        addressed: bool,
        unpackable: Callable[[Owed, BaseException], None],
        kernel_path: bool,
        max_message_size: int,
        sessions: SessionBalancer | None = None,
        max_connections_per_worker: int | None = None,
        max_connections_jitter: int | None = None,
    ) -> None:
        self._selector = selector
        self._supervisor = supervisor
        self._router = router
        self._hooks = hooks
        self._listening = listening
        self._addressed = addressed  # hand-offs carry their client's address (a proxy named it)
        self._unpackable = unpackable
        self._kernel_path = kernel_path
        # What a worker may send: MOVED (with descriptors) only when workers sort by session (route_by, kernel
        # path); otherwise a descriptor from a worker is a protocol error as soon as it arrives (wire rule 5).
        self._accepts = WORKER_SENDS if sessions else WORKER_SENDS - {FrameKind.MOVED, FrameKind.SESSIONS}
        self._sessions = sessions
        self._max_connections = max_connections_per_worker
        self._max_connections_jitter = max_connections_jitter
        self.counters = SlotCounters()
        self.touched: set[Link] = set()  # links with something queued this pass
        self.busy: dict[Link, None] = {}  # links with unhandled frames, in order
        self.next_full_check: float | None = None
        self._decisions: list[Decision] = []
        self.messages = MessageRouter(
            router,
            self.touched.add,
            lambda slot, message: run_hooks(hooks.message, slot, message),
            max_message_size,
            self.counters.messages_dropped,
        )
        self._handlers: dict[FrameKind, Callable[[Link, Frame], None]] = {
            FrameKind.READY: self._on_ready,
            FrameKind.PONG: lambda link, frame: None,  # any frame counts as a heartbeat
            FrameKind.SEND: self.messages.on_send,
            FrameKind.PUBLISH: self.messages.on_publish,
            FrameKind.CLOSED: self._on_closed,
            FrameKind.NO_ROOM: self._on_no_room,
            FrameKind.ACCEPTED: self._on_accepted,
            FrameKind.MOVED: self._on_moved,
            FrameKind.SESSIONS: self._on_sessions,
        }
        self._moved: list[tuple[int, int, ClientInfo]] = []  # (descriptor, family, client): to route again

    def take_moved(self) -> list[tuple[int, int, ClientInfo]]:
        """Connections workers accepted that belong elsewhere (route_by), for the loop to route again."""
        moved, self._moved = self._moved, []
        return moved

    def take_decisions(self) -> list[Decision]:
        """What the supervisor decided while frames were handled, for the loop to carry out."""
        decisions, self._decisions = self._decisions, []
        return decisions

    def last_heard(self, worker: WorkerProcess) -> float | None:
        link = self._router.links.get(worker)
        return link.last_heard if link is not None and link.connected else None

    # --- links --------------------------------------------------------------------

    def add(self, worker: WorkerProcess) -> Link:
        """A new worker process: its link, read from now on."""
        recycle_after = None
        if self._max_connections:
            jitter = self._max_connections_jitter
            if jitter is None:
                jitter = int(self._max_connections * RECYCLE_JITTER)
            recycle_after = self._max_connections + random.randint(0, jitter)
        now = time.monotonic()
        link = Link(
            worker,
            last_heard=now,
            recycle_after=recycle_after,
            accepts_reported_at=now,
            reader=FrameReader(self._accepts),
        )
        self._router.links[worker] = link
        self._router.mark_dirty()
        self._selector.register(worker.control, selectors.EVENT_READ, functools.partial(self._on_control, link))
        return link

    def put(self, worker: WorkerProcess, kind: FrameKind, payload: bytes = b"") -> None:
        """Send ``kind`` (STOP, PING, ROUTES) now, after every hand-off routed to the worker this pass."""
        link = self._router.links.get(worker)
        if link is not None and link.connected:
            link.frame_pending(self._addressed, self._unpackable)
            link.outbox.put(kind, payload)
            self.flush(link)

    def close(self, link: Link) -> None:
        """Close the link and park the connections it held that were not sent yet, to route again (master rule 2)."""
        if not link.connected:
            return
        self._selector.unregister(link.worker.control)
        self.messages.lost(link.worker.slot, link.outbox.queued_messages)  # (a worker gone with them unread)
        owed = link.close()
        self.busy.pop(link, None)
        self._park(link, owed)
        self._router.mark_dirty()
        self._supervisor.lost_control(link.worker)

    def drain_and_close(self, worker: WorkerProcess) -> None:
        """A reaped worker: read its last messages, close its link, route again what it never read (master rule 2)."""
        link = self._router.links.pop(worker)
        self._router.mark_dirty()
        for _ in range(MAX_DRAIN_READS):
            if not link.connected or not self.read(link, seconds=None):
                break
        self.close(link)
        self.read_back(link)

    def close_all(self) -> None:
        """The server stops: close every link and the master's copies of the workers' ends."""
        links = self._router.links
        for link in list(links.values()):
            self.close(link)
        for worker in links:
            if worker.worker_end is not None:
                worker.worker_end.close()  # the kernel closes what the worker never read
                worker.worker_end = None
        links.clear()
        self._router.mark_dirty()

    # --- reading ------------------------------------------------------------------

    def _on_control(self, link: Link, mask: int) -> None:
        # One select() batch can hold an event for a link an earlier callback closed.
        if not link.connected:
            return
        if mask & selectors.EVENT_READ and link not in self.busy:  # a busy link has had its slice
            self.read(link)
        if link.connected and mask & selectors.EVENT_WRITE:
            self.flush(link)

    def read(self, link: Link, seconds: float | None = SLICE_SECONDS) -> bool:
        """Handle the worker's frames for about ``seconds`` (None: all), reading more once none wait.

        Returns True if it found something to do and the link is still open.
        """
        try:
            closed = False
            if not link.unhandled:
                frames, closed = link.reader.read_from(link.worker.control)
                if frames:
                    link.last_heard = time.monotonic()
                    link.unhandled.extend(frames)
            self._handle(link, seconds)
        except BlockingIOError:
            return False
        except ProtocolError as exc:
            logger.error(
                "worker %d (pid %d) sent an invalid frame (%s); killing it", link.worker.slot, link.worker.pid, exc
            )
            self._kill_for_fault(link)
            return False
        except Exception:
            logger.exception(
                "handling a frame from worker %d (pid %d) failed; killing it", link.worker.slot, link.worker.pid
            )
            self._kill_for_fault(link)
            return False
        if closed:
            self.close(link)
            return False
        return True

    def _handle(self, link: Link, seconds: float | None) -> None:
        """Handle read frames in order for about ``seconds`` (None: all); a link left with some is busy."""
        frames, handlers = link.unhandled, self._handlers
        try:
            run_for(frames, lambda frame: handlers[frame.kind](link, frame), seconds)
        finally:
            if frames:
                self.busy[link] = None
            else:
                self.busy.pop(link, None)

    def _kill_for_fault(self, link: Link) -> None:
        """A worker whose frames cannot be handled is killed; reaping replaces it (error handling)."""
        self._supervisor.kill(link.worker)
        self.close(link)

    # --- the frames ------------------------------------------------------------------

    def _on_ready(self, link: Link, frame: Frame) -> None:
        link.ready(unpack_count(frame) if frame.payload else 0)  # empty: no limit known
        worker = link.worker
        logger.debug("worker %d (pid %d) is ready", worker.slot, worker.pid)
        if not self._supervisor.stopping:
            run_hooks(self._hooks.worker_start, worker.slot)
        self._decisions += self._supervisor.ready(worker)
        self._router.mark_dirty()

    def _on_closed(self, link: Link, frame: Frame) -> None:
        self._router.closed(link, unpack_count(frame))

    def _on_no_room(self, link: Link, frame: Frame) -> None:
        """Master rule 6: the worker lost hand-offs at its descriptor limit; its ceiling is what it holds now."""
        lost = unpack_count(frame)
        slot = link.worker.slot
        counted, left = link.lost_at_limit(lost)
        lost_no_room = self.counters.lost_no_room
        lost_no_room[slot] = lost_no_room.get(slot, 0) + lost
        if self._router.current.get(slot) is link:
            self._router.balancer.connections_closed(slot, counted)
        self._router.changed(link, left)

    def _on_accepted(self, link: Link, frame: Frame) -> None:
        """Kernel path: the worker accepted connections from its own listener; they count as its hand-offs."""
        if not self._kernel_path:
            raise ProtocolError("ACCEPTED from a worker that has no listener of its own (master path)")
        count = unpack_count(frame)
        left = link.accepted_itself(count, time.monotonic())
        self.counters.accepted_by_workers += count
        self._took(link, count)
        if left:
            self._router.changed(link, left)

    def _on_sessions(self, link: Link, frame: Frame) -> None:
        """The worker kept this many new sessions it accepted (the master places the rest)."""
        assert self._sessions is not None  # (the reader refuses SESSIONS otherwise)
        count = unpack_count(frame)
        if count > MAX_SESSIONS_REPORT:
            raise ProtocolError(f"SESSIONS {count}: more new sessions than a worker keeps between reports")
        self._sessions.kept(link.worker.slot, count)

    def _on_moved(self, link: Link, frame: Frame) -> None:
        """Kernel path with route_by: the worker accepted these, and their first request belongs elsewhere."""
        fds = [fd for fd in frame.fds if fd != LOST_FD]
        try:
            if not self._kernel_path:
                raise ProtocolError("MOVED from a worker that has no listener of its own (master path)")
            moved = [(fd, *moved_client(fd, self._listening)) for fd in fds]
        except BaseException:
            for fd in fds:
                os.close(fd)
            raise
        slot = link.worker.slot
        self.counters.moved[slot] = self.counters.moved.get(slot, 0) + len(moved)
        for fd, family, client in moved:
            if family:
                self._moved.append((fd, family, client))
            else:
                os.close(fd)  # the client left on the way: nobody to serve

    # --- writing --------------------------------------------------------------------

    def flush_touched(self) -> None:
        """Send what is queued: one frame per worker. A flush that finds a worker gone parks what it owed."""
        touched = self.touched
        links = list(touched)
        touched.clear()
        for link in links:
            if link.connected:
                link.frame_pending(self._addressed, self._unpackable)
                self.flush(link)

    def flush(self, link: Link) -> None:
        try:
            drained = link.outbox.flush(link.worker.control)
        except OSError:
            # The worker is gone; reaping or the read side will tell how.
            self.close(link)
            return
        sent, caught_up = link.sent()
        if sent:
            self._took(link, sent)
        if caught_up:
            self._router.changed(link)
        if drained == link.writing:
            link.writing = not drained
            events = selectors.EVENT_READ | (selectors.EVENT_WRITE if link.writing else 0)
            self._selector.modify(link.worker.control, events, functools.partial(self._on_control, link))

    def _took(self, link: Link, count: int) -> None:
        """``count`` more connections are the worker's: count them, and recycle it once it took its share."""
        slot = link.worker.slot
        handed_off = self.counters.handed_off
        handed_off[slot] = handed_off.get(slot, 0) + count
        if link.due_for_recycling():
            took = link.taken + link.accepted
            self._decisions += self._supervisor.replace(
                slot, f"it took {took} connections (max_connections_per_worker)"
            )
            self._router.mark_dirty()

    def routed(self, link: Link) -> None:
        """Something was queued on ``link`` this pass; a full one is looked at again soon (master rule 3)."""
        self.touched.add(link)
        if link.full and self.next_full_check is None:
            self.next_full_check = time.monotonic() + FULL_CHECK_INTERVAL

    def check_full(self, now: float) -> None:
        """Master rule 3: put full workers that have caught up back in the alive set."""
        still_full = False
        for link in list(self._router.links.values()):
            if link.caught_up():
                self._router.changed(link)
            elif link.full and link.connected:
                still_full = True
        self.next_full_check = now + FULL_CHECK_INTERVAL if still_full else None

    # --- master rule 2 -----------------------------------------------------------------------

    def _park(self, link: Link, owed: list[Owed]) -> None:
        """Park the connections ``link``'s worker never took; the loop routes them among the others."""
        if owed and not self._supervisor.stopping:
            logger.warning(
                "worker %d (pid %d) went away holding %d connection(s) it had not taken; routing them again",
                link.worker.slot,
                link.worker.pid,
                len(owed),
            )
        link.gave_back(len(owed))
        self._router.parked.extend(owed)

    def read_back(self, link: Link) -> None:
        """Route again what a gone worker never read; then close the master's copy of its end."""
        self._park(link, never_read(link, self._listening))
